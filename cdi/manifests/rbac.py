"""Service accounts and RBAC on a cluster: CDI's roles for users and for its own components.

The aggregated user roles (``cdi.kubevirt.io:admin``, ``:edit``, ``:view``,
``:config-reader``, ``:clone-sourcer``) are ``cdi.api.rbac_defaults.CDI_ROLES``,
the same objects ``cdi serve`` starts with, so a binding means the same on a
cluster as on one machine.  The component roles follow the seeds' tables:

- 1.4 / 1.6: the controller (service account ``cdi-sa``, ClusterRole ``cdi``,
  Role ``cdi-deployment``), as listed, plus ``cdi-extra`` for what the
  project's controllers do in-process where CDI uses worker pods;
- 1.3 / 1.5: the operator (``cdi-operator``).  There is no operator process
  here (Helm or ``kubectl apply`` does its installing, the apiserver its
  certificate work), so these are rendered only with ``rbac.operator`` for
  tools that install as ``cdi-operator``; the table comparison in the tests
  renders them;
- the apiserver and the upload proxy, which the tables leave out, get what
  their work needs: SubjectAccessReviews, reading claims and CDI objects, and
  (because the apiserver makes the certificates) updating the ``caBundle`` of
  its own webhook configurations and APIService, named one by one.
"""

from __future__ import annotations

import copy
from typing import Any

from cdi.api import rbac_defaults
from cdi.api.kinds import CDI, RBAC
from cdi.api.rbac_defaults import READ, rule

Obj = dict[str, Any]

UPLOAD = rbac_defaults.UPLOAD
CRUD = ["get", "list", "watch", "create", "update", "delete"]
LABELS = {"cdi.kubevirt.io": "", "app.kubernetes.io/component": "storage",
          "app.kubernetes.io/part-of": "cdi"}

CONTROLLER_SA = "cdi-sa"
APISERVER_SA = "cdi-apiserver"
UPLOADPROXY_SA = "cdi-uploadproxy"
OPERATOR_SA = "cdi-operator"

VALIDATING_WEBHOOKS = ["cdi-api-dataimportcron-validate", "cdi-api-populator-validate",
                       "cdi-api-datavolume-validate", "cdi-api-validate",
                       "objecttransfer-api-validate"]
MUTATING_WEBHOOKS = ["cdi-api-datavolume-mutate"]
API_SERVICE = f"v1beta1.{UPLOAD}"

# Seeds table 1.3: the operator's cluster-wide rules.
OPERATOR_CLUSTER_RULES = [
    rule(CRUD, groups=[RBAC], resources=["clusterrolebindings", "clusterroles"]),
    rule(["get", "list", "watch", "update", "create"], groups=["security.openshift.io"],
         resources=["securitycontextconstraints"]),
    rule(CRUD, groups=["apiextensions.k8s.io"],
         resources=["customresourcedefinitions", "customresourcedefinitions/status"]),
    rule(["*"], groups=[CDI], resources=["*"]),
    rule(["*"], groups=[UPLOAD], resources=["*"]),
    rule(["create", "list", "watch"], groups=["admissionregistration.k8s.io"],
         resources=["validatingwebhookconfigurations", "mutatingwebhookconfigurations"]),
    {**rule(["get", "update", "delete"], groups=["admissionregistration.k8s.io"],
            resources=["validatingwebhookconfigurations"]),
     "resourceNames": list(VALIDATING_WEBHOOKS)},
    {**rule(["get", "update", "delete"], groups=["admissionregistration.k8s.io"],
            resources=["mutatingwebhookconfigurations"]),
     "resourceNames": list(MUTATING_WEBHOOKS)},
    rule(CRUD, groups=["apiregistration.k8s.io"], resources=["apiservices"]),
]

# Seeds table 1.4: the controller's cluster-wide rules.
CONTROLLER_CLUSTER_RULES = [
    rule(["create", "patch"], resources=["events"]),
    rule(["get", "list", "watch", "create", "update", "delete", "deletecollection", "patch"],
         resources=["persistentvolumeclaims"]),
    rule(["get", "list", "watch", "update"], resources=["persistentvolumes"]),
    rule(["update"], resources=["persistentvolumeclaims/finalizers", "pods/finalizers"]),
    rule(["get", "list", "watch", "create", "delete"], resources=["pods", "services"]),
    rule(["get", "create"], resources=["configmaps"]),
    rule(READ, groups=["storage.k8s.io"], resources=["storageclasses", "csidrivers"]),
    rule(READ, groups=["config.openshift.io"], resources=["proxies"]),
    rule(["*"], groups=[CDI], resources=["*"]),
    rule(["get", "list", "watch", "create", "delete"], groups=["snapshot.storage.k8s.io"],
         resources=["volumesnapshots", "volumesnapshotclasses", "volumesnapshotcontents"]),
    rule(["update", "deletecollection"], groups=["snapshot.storage.k8s.io"],
         resources=["volumesnapshots"]),
    rule(READ, groups=["apiextensions.k8s.io"], resources=["customresourcedefinitions"]),
    rule(READ, groups=["scheduling.k8s.io"], resources=["priorityclasses"]),
    rule(READ, groups=["image.openshift.io"], resources=["imagestreams"]),
    rule(["create"], resources=["secrets"]),
    rule(["update"], groups=["kubevirt.io"], resources=["virtualmachines/finalizers"]),
]

# Seeds table 1.5: the operator's rules in the CDI namespace.
OPERATOR_NAMESPACE_RULES = [
    rule(CRUD, groups=[RBAC], resources=["rolebindings", "roles"]),
    rule(["get", "list", "watch", "create", "update", "patch", "delete"],
         resources=["serviceaccounts", "configmaps", "events", "secrets", "services"]),
    rule(CRUD, groups=["apps"], resources=["deployments", "deployments/finalizers"]),
    rule(["get", "list", "watch", "create", "update"], groups=["route.openshift.io"],
         resources=["routes", "routes/custom-host"]),
    rule(READ, groups=["config.openshift.io"], resources=["proxies"]),
    rule(["get", "list", "watch", "create", "delete", "update", "patch"],
         groups=["monitoring.coreos.com"], resources=["servicemonitors", "prometheusrules"]),
    rule(["get", "create", "update"], groups=["coordination.k8s.io"], resources=["leases"]),
]

# Seeds table 1.6: the controller's rules in the CDI namespace.
CONTROLLER_NAMESPACE_RULES = [
    rule(CRUD, resources=["configmaps"]),
    rule(READ, resources=["secrets"]),
    rule(CRUD, groups=["batch"], resources=["cronjobs"]),
    rule(["create", "delete", "list", "watch"], groups=["batch"], resources=["jobs"]),
    rule(["get", "create", "update"], groups=["coordination.k8s.io"], resources=["leases"]),
    rule(READ, groups=["networking.k8s.io"], resources=["ingresses"]),
    rule(READ, groups=["route.openshift.io"], resources=["routes"]),
]

# Beyond table 1.4: what this project's controllers do in-process that CDI
# does in worker pods.  They read the Secrets a DataVolume or DataImportCron
# names (registry pull secrets, HTTP credentials: cdi/controllers/cronpoll.py,
# cronhttp.py, datavolume.py) and delete the per-pod certificate Secrets they
# made when a clone or upload ends (cdi/controllers/clone/controller.py).  In
# generate mode they also replace the upload CAs and the proxy's certificates
# near their end (cdi/cli/certrotation.py; CDI's operator does that): update,
# of those Secrets only.
CONTROLLER_EXTRA_CLUSTER_ROLE = "cdi-extra"
ROTATED_SECRETS = ["cdi-uploadserver-signer", "cdi-uploadserver-client-signer",
                   "cdi-uploadproxy-signer", "cdi-uploadserver-client-cert",
                   "cdi-uploadproxy-server-cert"]
CONTROLLER_EXTRA_CLUSTER_RULES = [
    rule(["get", "delete"], resources=["secrets"]),
    {**rule(["update"], resources=["secrets"]), "resourceNames": ROTATED_SECRETS},
]

APISERVER_CLUSTER_RULES = [
    rule(["create"], groups=["authorization.k8s.io"], resources=["subjectaccessreviews"]),
    rule(READ, resources=["persistentvolumeclaims", "persistentvolumes", "configmaps"]),
    rule(["get"], resources=["namespaces"]),
    rule(READ, groups=["storage.k8s.io"], resources=["storageclasses"]),
    rule(READ, groups=["snapshot.storage.k8s.io"], resources=["volumesnapshots"]),
    rule(READ, groups=[CDI], resources=["datavolumes", "datasources", "storageprofiles",
                                        "cdis", "cdiconfigs"]),
    {**rule(["get", "update", "patch"], groups=["admissionregistration.k8s.io"],
            resources=["validatingwebhookconfigurations"]),
     "resourceNames": ["cdi-api-datavolume-validate"]},
    {**rule(["get", "update", "patch"], groups=["admissionregistration.k8s.io"],
            resources=["mutatingwebhookconfigurations"]),
     "resourceNames": list(MUTATING_WEBHOOKS)},
    {**rule(["get", "update", "patch"], groups=["apiregistration.k8s.io"],
            resources=["apiservices"]),
     "resourceNames": [API_SERVICE]},
]
APISERVER_NAMESPACE_RULES = [
    rule(["get", "list", "watch", "create", "update"], resources=["secrets", "configmaps"]),
]
UPLOADPROXY_CLUSTER_RULES = [rule(["get"], resources=["persistentvolumeclaims"])]
UPLOADPROXY_NAMESPACE_RULES = [rule(["get"], resources=["configmaps"])]


def objects(namespace: str, *, operator: bool = False) -> list[Obj]:
    """Service accounts, roles and bindings, users' roles first."""
    found = [copy.deepcopy(o) for o in rbac_defaults.CDI_ROLES]
    components = [
        (CONTROLLER_SA, "cdi", CONTROLLER_CLUSTER_RULES, "cdi-deployment",
         CONTROLLER_NAMESPACE_RULES),
        (APISERVER_SA, APISERVER_SA, APISERVER_CLUSTER_RULES, APISERVER_SA,
         APISERVER_NAMESPACE_RULES),
        (UPLOADPROXY_SA, UPLOADPROXY_SA, UPLOADPROXY_CLUSTER_RULES, UPLOADPROXY_SA,
         UPLOADPROXY_NAMESPACE_RULES),
    ]
    if operator:
        components.append((OPERATOR_SA, "cdi-operator-cluster", OPERATOR_CLUSTER_RULES,
                           OPERATOR_SA, OPERATOR_NAMESPACE_RULES))
    for sa, cluster_role, cluster_rules, role, namespace_rules in components:
        found.append(service_account(sa, namespace))
        found.append(_role("ClusterRole", cluster_role, None, cluster_rules))
        found.append(_binding("ClusterRoleBinding", sa, None, cluster_role, sa, namespace))
        found.append(_role("Role", role, namespace, namespace_rules))
        found.append(_binding("RoleBinding", role, namespace, role, sa, namespace))
        if sa == CONTROLLER_SA:
            extra = CONTROLLER_EXTRA_CLUSTER_ROLE
            found.append(_role("ClusterRole", extra, None, CONTROLLER_EXTRA_CLUSTER_RULES))
            found.append(_binding("ClusterRoleBinding", f"{sa}-extra", None, extra, sa,
                                  namespace))
    return found


def service_account(name: str, namespace: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)}}


def _meta(name: str, namespace: str | None) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(LABELS)
    return meta


def _role(kind: str, name: str, namespace: str | None, rules: list[Obj]) -> Obj:
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": _meta(name, namespace),
            "rules": copy.deepcopy(rules)}


def _binding(kind: str, name: str, namespace: str | None, role: str, sa: str,
             sa_namespace: str) -> Obj:
    role_kind = "Role" if kind == "RoleBinding" else "ClusterRole"
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": _meta(name, namespace),
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}]}
