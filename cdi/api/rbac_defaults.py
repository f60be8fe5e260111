"""The RBAC objects a fresh ``cdi serve`` starts with, as Kubernetes and CDI install them.

A cluster has these before any user arrives: Kubernetes' bootstrap policy
(``cluster-admin`` bound to ``system:masters``; the aggregated ``admin``,
``edit`` and ``view`` roles; discovery for every authenticated user) and the
ClusterRoles CDI's operator installs (``cdi.kubevirt.io:admin``, ``:edit``,
``:view``, ``:clone-sourcer``, ``:config-reader``).  Manifests written for a
cluster, such as "bind ``cdi.kubevirt.io:view`` to alice" or a RoleBinding to
``edit``, then mean the same thing here.

Sources:

- CDI's roles are ``pkg/operator/resources/cluster/rbac.go`` of
  kubevirt/containerized-data-importer at c07cdb6 (the seed's table 1.2
  summarises an older CDI, whose ``view`` role still granted
  ``datavolumes/source``; CDI #4219 moved that grant into the separate,
  unaggregated ``cdi.kubevirt.io:clone-sourcer``, and we follow CDI).  The
  aggregation labels are CDI's ``rbac.authorization.k8s.io/aggregate-to-<role>:
  "true"``.
- Kubernetes' roles are ``plugin/pkg/auth/authorizer/rbac/bootstrappolicy``:
  ``admin``/``edit``/``view`` aggregate by those labels (``edit`` is itself
  aggregated into ``admin`` and ``view`` into ``edit``), and the
  ``system:aggregate-to-*`` roles carry the core rules, cut down to the
  resources this server has (no deployments, jobs, ingresses, ...).

``cdi serve`` creates whichever of these is missing at start-up and never
overwrites one that exists, so local changes survive a restart.
"""

from __future__ import annotations

from typing import Any

from cdi.api.kinds import CDI, RBAC

Obj = dict[str, Any]

API_VERSION = f"{RBAC}/v1"
READ = ["get", "list", "watch"]
WRITE = ["create", "delete", "deletecollection", "patch", "update"]
READ_WRITE = READ + WRITE

AGGREGATE_TO = "rbac.authorization.k8s.io/aggregate-to-"
_K8S_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_K8S_ANNOTATIONS = {"rbac.authorization.kubernetes.io/autoupdate": "true"}
_CDI_LABELS = {"cdi.kubevirt.io": "", "app.kubernetes.io/component": "storage"}


def rule(verbs: list[str], *, groups: list[str] | None = None,
         resources: list[str] | None = None, urls: list[str] | None = None) -> Obj:
    """A PolicyRule: resources in API groups, or non-resource URLs."""
    if urls is not None:
        return {"nonResourceURLs": urls, "verbs": verbs}
    return {"apiGroups": groups or [""], "resources": resources or [], "verbs": verbs}


def cluster_role(name: str, rules: list[Obj] | None = None, *,
                 labels: dict[str, str] | None = None,
                 aggregate: str | None = None, kubernetes: bool = False) -> Obj:
    """A ClusterRole; AGGREGATE makes it gather the roles labelled aggregate-to-AGGREGATE."""
    meta: Obj = {"name": name, "labels": {**(_K8S_LABELS if kubernetes else _CDI_LABELS),
                                          **(labels or {})}}
    if kubernetes:
        meta["annotations"] = dict(_K8S_ANNOTATIONS)
    role: Obj = {"apiVersion": API_VERSION, "kind": "ClusterRole", "metadata": meta,
                 "rules": rules or []}
    if aggregate is not None:
        role["aggregationRule"] = {"clusterRoleSelectors": [
            {"matchLabels": {AGGREGATE_TO + aggregate: "true"}}]}
    return role


def cluster_role_binding(name: str, role: str, groups: list[str], *,
                         kubernetes: bool = False) -> Obj:
    meta: Obj = {"name": name, "labels": dict(_K8S_LABELS if kubernetes else _CDI_LABELS)}
    if kubernetes:
        meta["annotations"] = dict(_K8S_ANNOTATIONS)
    return {"apiVersion": API_VERSION, "kind": "ClusterRoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": RBAC, "kind": "Group", "name": g} for g in groups]}


def _to(role: str) -> dict[str, str]:
    return {AGGREGATE_TO + role: "true"}


# --- Kubernetes' bootstrap policy (the part that applies here) --------------------------------

_DISCOVERY_URLS = ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi",
                   "/openapi/*", "/readyz", "/version", "/version/"]
_PUBLIC_INFO_URLS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]

KUBERNETES: tuple[Obj, ...] = (
    cluster_role("cluster-admin", [rule(["*"], groups=["*"], resources=["*"]),
                                   rule(["*"], urls=["*"])], kubernetes=True),
    cluster_role_binding("cluster-admin", "cluster-admin", ["system:masters"], kubernetes=True),
    cluster_role("admin", aggregate="admin", kubernetes=True),
    cluster_role("edit", labels=_to("admin"), aggregate="edit", kubernetes=True),
    cluster_role("view", labels=_to("edit"), aggregate="view", kubernetes=True),
    cluster_role("system:aggregate-to-admin", [
        rule(READ_WRITE, groups=[RBAC], resources=["roles", "rolebindings"]),
    ], labels=_to("admin"), kubernetes=True),
    cluster_role("system:aggregate-to-edit", [
        rule(READ, resources=["secrets"]),
        rule(WRITE, resources=["pods"]),
        rule(WRITE, resources=["services", "persistentvolumeclaims", "configmaps", "secrets"]),
    ], labels=_to("edit"), kubernetes=True),
    cluster_role("system:aggregate-to-view", [
        rule(READ, resources=["pods", "services", "services/status", "persistentvolumeclaims",
                              "persistentvolumeclaims/status", "configmaps"]),
        rule(READ, resources=["events", "pods/status", "namespaces/status", "pods/log"]),
        rule(READ, resources=["namespaces"]),
    ], labels=_to("view"), kubernetes=True),
    cluster_role("system:discovery", [rule(["get"], urls=_DISCOVERY_URLS)], kubernetes=True),
    cluster_role_binding("system:discovery", "system:discovery", ["system:authenticated"],
                         kubernetes=True),
    cluster_role("system:public-info-viewer", [rule(["get"], urls=_PUBLIC_INFO_URLS)],
                 kubernetes=True),
    cluster_role_binding("system:public-info-viewer", "system:public-info-viewer",
                         ["system:authenticated", "system:unauthenticated"], kubernetes=True),
)

# --- CDI's operator ------------------------------------------------------------------------

UPLOAD = "upload.cdi.kubevirt.io"
FORKLIFT = "forklift.cdi.kubevirt.io"
CLONE_SOURCE = "datavolumes/source"

_ADMIN_RULES = [
    rule(["*"], groups=[CDI], resources=["datavolumes", "dataimportcrons", "datasources",
                                         "volumeimportsources", "volumeuploadsources",
                                         "volumeclonesources"]),
    rule(["create"], groups=[CDI], resources=[CLONE_SOURCE]),
    rule(["*"], groups=[UPLOAD], resources=["uploadtokenrequests"]),
    rule(["*"], groups=[FORKLIFT], resources=["ovirtvolumepopulators",
                                              "openstackvolumepopulators"]),
]
_VIEW_RULES = [
    rule(READ, groups=[CDI], resources=["cdiconfigs", "dataimportcrons", "datasources",
                                        "datavolumes", "objecttransfers", "storageprofiles",
                                        "volumeimportsources", "volumeuploadsources",
                                        "volumeclonesources"]),
    rule(READ, groups=[FORKLIFT], resources=["ovirtvolumepopulators",
                                             "openstackvolumepopulators"]),
]

CDI_ROLES: tuple[Obj, ...] = (
    cluster_role("cdi.kubevirt.io:admin", _ADMIN_RULES, labels=_to("admin")),
    # CDI: "diff between admin and edit ClusterRoles is minimal and limited to RBAC".
    cluster_role("cdi.kubevirt.io:edit", _ADMIN_RULES, labels=_to("edit")),
    cluster_role("cdi.kubevirt.io:view", _VIEW_RULES, labels=_to("view")),
    cluster_role("cdi.kubevirt.io:clone-sourcer",
                 [rule(["create"], groups=[CDI], resources=[CLONE_SOURCE])]),
    cluster_role("cdi.kubevirt.io:config-reader",
                 [rule(READ, groups=[CDI], resources=["cdiconfigs", "storageprofiles"])]),
    # "system:serviceaccount" (singular) is CDI's own spelling; kept as CDI ships it.
    cluster_role_binding("cdi.kubevirt.io:config-reader", "cdi.kubevirt.io:config-reader",
                         ["system:authenticated", "system:serviceaccount"]),
)

DEFAULTS: tuple[Obj, ...] = KUBERNETES + CDI_ROLES
