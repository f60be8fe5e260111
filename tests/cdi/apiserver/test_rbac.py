"""Kubernetes RBAC in the API server: the authorizer table by table, request attributes,
kube-apiserver's refusals, CDI's clone check, escalation, tokens, and a real server."""

from __future__ import annotations

import asyncio
import copy
import logging
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from cdi.api import errors, validation
from cdi.api.rbac_defaults import DEFAULTS
from cdi.api.sourceref import CloneSource
from cdi.apiserver import admission, auth, rbac
from cdi.apiserver.admission import AdmissionRequest, can_clone
from cdi.apiserver.app import create_app
from cdi.apiserver.auth import TokenRegistry, UserInfo
from cdi.apiserver.rbac import Attributes, Policy
from cdi.backends.embedded.store import SQLiteStore
from tests.cdi.apiserver.harness import TOKEN, ApiServer, datavolume
from tests.cdi.apiserver.harness import auth as admin_auth

RBAC = "rbac.authorization.k8s.io"
CDI = "cdi.kubevirt.io"


def cluster_role(name: str, *rules: dict[str, Any], labels: dict[str, str] | None = None,
                 aggregate: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": f"{RBAC}/v1", "kind": "ClusterRole",
                           "metadata": {"name": name, "labels": labels or {}},
                           "rules": list(rules)}
    if aggregate is not None:
        obj["aggregationRule"] = {"clusterRoleSelectors": aggregate}
    return obj


def role(name: str, namespace: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{RBAC}/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace}, "rules": list(rules)}


def binding(name: str, role_kind: str, role_name: str, *subjects: dict[str, str],
            namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": f"{RBAC}/v1",
            "kind": "RoleBinding" if namespace else "ClusterRoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role_name},
            "subjects": list(subjects)}


def rule(verbs: list[str], groups: list[str] | None = None, resources: list[str] | None = None,
         names: list[str] | None = None, urls: list[str] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"verbs": verbs}
    if urls is not None:
        r["nonResourceURLs"] = urls
    else:
        r["apiGroups"] = groups if groups is not None else [""]
        r["resources"] = resources or []
    if names:
        r["resourceNames"] = names
    return r


def User(name: str) -> dict[str, str]:
    return {"kind": "User", "apiGroup": RBAC, "name": name}


def Group(name: str) -> dict[str, str]:
    return {"kind": "Group", "apiGroup": RBAC, "name": name}


def ServiceAccount(name: str, namespace: str | None = None) -> dict[str, str]:
    s = {"kind": "ServiceAccount", "name": name}
    if namespace:
        s["namespace"] = namespace
    return s


# The seed's chapter 8.6, placeholders filled in.
CLONER = cluster_role("datavolume-cloner", rule(["*"], [CDI], ["datavolumes/source"]))
ALLOW_CLONE = binding("allow-clone-to-user", "ClusterRole", "datavolume-cloner",
                      ServiceAccount("default", "target-ns"), namespace="source-ns")

OBJECTS = [
    *copy.deepcopy(list(DEFAULTS)),
    CLONER, ALLOW_CLONE,
    cluster_role("pods-reader", rule(["get", "list"], resources=["pods"])),
    cluster_role("pod-creator", rule(["create"], resources=["pods", "persistentvolumeclaims"])),
    cluster_role("named-cm", rule(["get", "update"], resources=["configmaps"], names=["cm1"])),
    cluster_role("any-status", rule(["get"], ["*"], ["*/status"])),
    cluster_role("metrics", rule(["get"], urls=["/metrics", "/logs/*"])),
    cluster_role("agg-parent", aggregate=[{"matchLabels": {"example.com/agg": "true"}},
                                          {"matchExpressions": [{"key": "tier",
                                                                 "operator": "In",
                                                                 "values": ["gold"]}]}]),
    cluster_role("agg-child", rule(["get"], resources=["services"]),
                 labels={"example.com/agg": "true"}),
    cluster_role("agg-gold", rule(["delete"], resources=["services"]), labels={"tier": "gold"}),
    cluster_role("agg-silver", rule(["create"], resources=["services"]),
                 labels={"tier": "silver"}),
    role("dv-creator", "dev", rule(["create"], [CDI], ["datavolumes"])),
    binding("alice-pods", "ClusterRole", "pods-reader", User("alice")),
    binding("bob-dv", "Role", "dv-creator", User("bob"), namespace="dev"),
    binding("devs-view", "ClusterRole", "cdi.kubevirt.io:view", Group("devs"), namespace="dev"),
    binding("carol-missing", "ClusterRole", "no-such-role", User("carol"), namespace="dev"),
    binding("builder-edit", "ClusterRole", "edit", ServiceAccount("builder"), namespace="dev"),
    binding("dave-metrics", "ClusterRole", "metrics", User("dave")),
    binding("erin-cm", "ClusterRole", "named-cm", User("erin"), namespace="dev"),
    binding("frank-status", "ClusterRole", "any-status", User("frank")),
    binding("gina-admin", "ClusterRole", "admin", User("gina"), namespace="dev"),
    binding("hank-agg", "ClusterRole", "agg-parent", User("hank")),
    binding("pat-pods", "ClusterRole", "pod-creator", User("pat"), namespace="dev"),
    binding("ivan-role-elsewhere", "Role", "dv-creator", User("ivan"), namespace="prod"),
]
POLICY = Policy(OBJECTS)

SA_DEFAULT = auth.service_account("target-ns", "default")
SA_BUILDER = auth.service_account("dev", "builder")


def who(name: str, *groups: str) -> UserInfo:
    return auth.user(name, list(groups))


def ask(user: UserInfo, verb: str, namespace: str = "", group: str = "", resource: str = "",
        subresource: str = "", name: str = "", path: str = "") -> Attributes:
    return Attributes(user, verb, namespace, group, resource, subresource, name, path)


@pytest.mark.parametrize(("asked", "allowed"), [
    # verbs, and a ClusterRoleBinding applying in every namespace and cluster-wide
    (ask(who("alice"), "get", "any", "", "pods"), True),
    (ask(who("alice"), "list", "", "", "pods"), True),
    (ask(who("alice"), "watch", "any", "", "pods"), False),
    (ask(who("alice"), "delete", "any", "", "pods", name="p"), False),
    # API groups: the same resource name in another group is another resource
    (ask(who("alice"), "get", "any", "metrics.k8s.io", "pods"), False),
    # a Role through a RoleBinding: its namespace only
    (ask(who("bob"), "create", "dev", CDI, "datavolumes"), True),
    (ask(who("bob"), "create", "prod", CDI, "datavolumes"), False),
    (ask(who("bob"), "get", "dev", CDI, "datavolumes"), False),
    # a RoleBinding to a Role in another namespace is not found there
    (ask(who("ivan"), "create", "prod", CDI, "datavolumes"), False),
    # groups; a ClusterRole through a RoleBinding applies in that namespace only
    (ask(who("x", "devs"), "list", "dev", CDI, "datavolumes"), True),
    (ask(who("x", "devs"), "watch", "dev", CDI, "datavolumes"), True),
    (ask(who("x", "devs"), "create", "dev", CDI, "datavolumes"), False),
    (ask(who("x", "devs"), "list", "prod", CDI, "datavolumes"), False),
    (ask(who("x", "devs"), "list", "", CDI, "datavolumes"), False),
    (ask(who("x"), "list", "dev", CDI, "datavolumes"), False),
    # subresources: an exact "res/sub", or "*/sub"; a resource rule is not its subresources
    (ask(SA_DEFAULT, "create", "source-ns", CDI, "datavolumes", "source", "golden"), True),
    (ask(SA_DEFAULT, "create", "source-ns", CDI, "datavolumes"), False),
    (ask(SA_DEFAULT, "create", "target-ns", CDI, "datavolumes", "source", "golden"), False),
    (ask(who("frank"), "get", "ns", CDI, "datavolumes", "status", "a"), True),
    (ask(who("frank"), "get", "", "", "persistentvolumes", "status", "pv"), True),
    (ask(who("frank"), "get", "ns", CDI, "datavolumes", "", "a"), False),
    (ask(who("alice"), "get", "ns", "", "pods", "log", "p"), False),
    # resourceNames: only the named object; a list has no name
    (ask(who("erin"), "get", "dev", "", "configmaps", name="cm1"), True),
    (ask(who("erin"), "update", "dev", "", "configmaps", name="cm1"), True),
    (ask(who("erin"), "get", "dev", "", "configmaps", name="cm2"), False),
    (ask(who("erin"), "list", "dev", "", "configmaps"), False),
    # service accounts: the subject's namespace defaults to the binding's
    (ask(SA_BUILDER, "create", "dev", "", "pods"), True),
    (ask(SA_BUILDER, "create", "dev", "", "persistentvolumeclaims"), True),
    (ask(SA_BUILDER, "delete", "dev", CDI, "datavolumes", name="a"), True),
    (ask(auth.service_account("other", "builder"), "create", "dev", "", "pods"), False),
    (ask(who("system:serviceaccount:dev:builder"), "create", "dev", "", "pods"), True),
    # aggregation: Kubernetes' admin > edit > view, with CDI's roles aggregated in
    (ask(who("gina"), "create", "dev", RBAC, "rolebindings"), True),
    (ask(who("gina"), "deletecollection", "dev", CDI, "datavolumes"), True),
    (ask(who("gina"), "create", "dev", CDI, "datavolumes", "source", "x"), True),
    (ask(who("gina"), "create", "dev", "upload.cdi.kubevirt.io", "uploadtokenrequests"), True),
    (ask(who("gina"), "get", "dev", "", "pods", "log", "p"), True),
    (ask(who("gina"), "get", "", CDI, "storageprofiles", name="x"), True),
    (ask(who("gina"), "create", "other", "", "pods"), False),
    (ask(who("gina"), "create", "dev", "", "persistentvolumes"), False),
    # aggregation by matchLabels and matchExpressions; unselected roles add nothing
    (ask(who("hank"), "get", "ns", "", "services", name="s"), True),
    (ask(who("hank"), "delete", "ns", "", "services", name="s"), True),
    (ask(who("hank"), "create", "ns", "", "services"), False),
    # non-resource URLs, with a trailing * as a prefix
    (ask(who("dave"), "get", path="/metrics"), True),
    (ask(who("dave"), "get", path="/logs/kubelet.log"), True),
    (ask(who("dave"), "post", path="/metrics"), False),
    (ask(who("dave"), "get", path="/metrics/x"), False),
    # discovery for every authenticated identity, CDI's config-reader binding too
    (ask(who("nobody"), "get", path="/apis/cdi.kubevirt.io/v1beta1"), True),
    (ask(who("nobody"), "get", path="/version"), True),
    (ask(who("nobody"), "get", "", CDI, "storageprofiles", name="local"), True),
    (ask(who("nobody"), "list", "", CDI, "cdiconfigs"), True),
    (ask(who("nobody"), "update", "", CDI, "cdiconfigs", name="config"), False),
    (ask(UserInfo("anonymous", ("system:unauthenticated",)), "get", path="/apis"), False),
    (ask(UserInfo("anonymous", ("system:unauthenticated",)), "get", path="/healthz"), True),
    # system:masters may do anything, bound or not
    (ask(auth.ADMIN, "deletecollection", "x", "anything", "whatever"), True),
    (ask(who("root", "system:masters"), "escalate", "", RBAC, "clusterroles"), True),
], ids=lambda v: f"{v.user.name}:{v.verb}:{v.namespace}:{v.resource}/{v.subresource}:"
                 f"{v.name or v.path}" if isinstance(v, Attributes) else str(v))
def test_authorize(asked: Attributes, allowed: bool) -> None:
    assert POLICY.authorize(asked).allowed is allowed


def test_seed_cdi_roles_are_aggregated_with_their_labels() -> None:
    by_name = {o["metadata"]["name"]: o for o in DEFAULTS}
    for name, to in [("cdi.kubevirt.io:admin", "admin"), ("cdi.kubevirt.io:edit", "edit"),
                     ("cdi.kubevirt.io:view", "view")]:
        assert by_name[name]["metadata"]["labels"][
            f"rbac.authorization.k8s.io/aggregate-to-{to}"] == "true"
        assert by_name[to]["aggregationRule"]["clusterRoleSelectors"] == [
            {"matchLabels": {f"rbac.authorization.k8s.io/aggregate-to-{to}": "true"}}]
    edit = POLICY.cluster_role_rules("cdi.kubevirt.io:edit")
    view = POLICY.cluster_role_rules("cdi.kubevirt.io:view")
    reader = POLICY.cluster_role_rules("cdi.kubevirt.io:config-reader")
    user = who("u")
    assert any(r.allows(ask(user, "create", "n", CDI, "datavolumes", "source", "s")) for r in edit)
    assert not any(r.allows(ask(user, "create", "n", CDI, "datavolumes")) for r in view)
    assert all(any(r.allows(ask(user, v, "", CDI, res)) for r in reader)
               for v in ("get", "list", "watch") for res in ("cdiconfigs", "storageprofiles"))
    # edit's rules made it into the Kubernetes roles
    assert set(edit) <= set(POLICY.cluster_role_rules("edit"))
    assert set(POLICY.cluster_role_rules("view")) <= set(POLICY.cluster_role_rules("admin"))


def test_an_aggregated_roles_own_rules_are_ignored() -> None:
    policy = Policy([
        cluster_role("parent", rule(["*"], ["*"], ["*"]), aggregate=[]),
        binding("b", "ClusterRole", "parent", User("u")),
    ])
    assert not policy.authorize(ask(who("u"), "get", "n", "", "pods")).allowed


def test_aggregation_cycles_end() -> None:
    policy = Policy([
        cluster_role("a", rule(["get"], resources=["pods"]), labels={"x": "a"},
                     aggregate=[{"matchLabels": {"x": "b"}}]),
        cluster_role("b", rule(["list"], resources=["pods"]), labels={"x": "b"},
                     aggregate=[{"matchLabels": {"x": "a"}}]),
        cluster_role("leaf", rule(["watch"], resources=["pods"]), labels={"x": "b"}),
        binding("b", "ClusterRole", "a", User("u")),
    ])
    assert policy.authorize(ask(who("u"), "watch", "n", "", "pods")).allowed
    assert not policy.authorize(ask(who("u"), "delete", "n", "", "pods", name="p")).allowed


def test_missing_roles_are_the_reason() -> None:
    decision = POLICY.authorize(ask(who("carol"), "get", "dev", "", "pods", name="p"))
    assert decision == rbac.Decision(
        False, 'RBAC: clusterrole.rbac.authorization.k8s.io "no-such-role" not found')
    two = Policy([binding("a", "ClusterRole", "gone", User("u")),
                  binding("b", "Role", "gone", User("u"), namespace="n")])
    assert two.authorize(ask(who("u"), "get", "n", "", "pods")).reason == (
        'RBAC: [clusterrole.rbac.authorization.k8s.io "gone" not found, '
        'role.rbac.authorization.k8s.io "gone" not found]')


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("GET", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes", {},
     ("list", "ns", CDI, "datavolumes", "", "")),
    ("GET", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes", {"watch": "true"},
     ("watch", "ns", CDI, "datavolumes", "", "")),
    ("GET", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes",
     {"watch": "1", "fieldSelector": "metadata.name=a"},
     ("watch", "ns", CDI, "datavolumes", "", "a")),
    ("GET", "/apis/cdi.kubevirt.io/v1beta1/datavolumes", {},
     ("list", "", CDI, "datavolumes", "", "")),
    ("HEAD", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes/a", {},
     ("get", "ns", CDI, "datavolumes", "", "a")),
    ("POST", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes", {},
     ("create", "ns", CDI, "datavolumes", "", "")),
    ("PUT", "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes/a/status", {},
     ("update", "ns", CDI, "datavolumes", "status", "a")),
    ("PATCH", "/api/v1/namespaces/ns/persistentvolumeclaims/a", {},
     ("patch", "ns", "", "persistentvolumeclaims", "", "a")),
    ("DELETE", "/api/v1/namespaces/ns/pods/a", {}, ("delete", "ns", "", "pods", "", "a")),
    ("DELETE", "/api/v1/namespaces/ns/pods", {}, ("deletecollection", "ns", "", "pods", "", "")),
    ("GET", "/api/v1/namespaces/ns/pods/a/log", {}, ("get", "ns", "", "pods", "log", "a")),
    ("GET", "/api/v1/namespaces/ns", {}, ("get", "ns", "", "namespaces", "", "ns")),
    ("GET", "/api/v1/namespaces", {}, ("list", "", "", "namespaces", "", "")),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin", {},
     ("get", "", RBAC, "clusterroles", "", "admin")),
    ("POST", "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/ns/uploadtokenrequests", {},
     ("create", "ns", "upload.cdi.kubevirt.io", "uploadtokenrequests", "", "")),
])
def test_request_attributes(method: str, path: str, query: dict[str, str],
                            expected: tuple[str, ...]) -> None:
    a = rbac.attributes(method, path, query, who("u"))
    assert (a.verb, a.namespace, a.api_group, a.resource, a.subresource, a.name) == expected
    assert a.resource_request


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/version"), ("GET", "/apis"), ("GET", "/api"), ("GET", "/api/v1"),
    ("GET", "/apis/cdi.kubevirt.io"), ("GET", "/apis/cdi.kubevirt.io/v1beta1"),
    ("GET", "/openapi/v3"), ("POST", "/auth/v1/tokens"),
])
def test_non_resource_requests(method: str, path: str) -> None:
    a = rbac.attributes(method, path, {}, who("u"))
    assert (a.resource_request, a.verb, a.path) == (False, method.lower(), path)


@pytest.mark.parametrize(("asked", "reason", "message", "details"), [
    (ask(who("alice"), "list", "default", CDI, "datavolumes"), "",
     'datavolumes.cdi.kubevirt.io is forbidden: User "alice" cannot list resource '
     '"datavolumes" in API group "cdi.kubevirt.io" in the namespace "default"',
     {"group": CDI, "kind": "datavolumes"}),
    (ask(who("alice"), "get", "ns", "", "pods", "log", "p"), "",
     'pods "p" is forbidden: User "alice" cannot get resource "pods/log" in API group "" '
     'in the namespace "ns"', {"kind": "pods", "name": "p"}),
    (ask(who("alice"), "list", "", CDI, "storageprofiles"), "",
     'storageprofiles.cdi.kubevirt.io is forbidden: User "alice" cannot list resource '
     '"storageprofiles" in API group "cdi.kubevirt.io" at the cluster scope',
     {"group": CDI, "kind": "storageprofiles"}),
    (ask(who("carol"), "get", "dev", "", "pods", name="p"), "RBAC: x",
     'pods "p" is forbidden: User "carol" cannot get resource "pods" in API group "" in the '
     'namespace "dev": RBAC: x', {"kind": "pods", "name": "p"}),
    (ask(who("alice"), "post", path="/auth/v1/tokens"), "",
     'forbidden: User "alice" cannot post path "/auth/v1/tokens"', None),
])
def test_forbidden_is_kube_apiservers(asked: Attributes, reason: str, message: str,
                                      details: dict[str, str] | None) -> None:
    status = rbac.forbidden(asked, reason).status()
    assert (status["code"], status["reason"], status["message"]) == (403, "Forbidden", message)
    assert status.get("details") == details


# --- CDI's clone authorization -----------------------------------------------------------------

DENIED = "User {} has insufficient permissions in clone source namespace {}"


@pytest.mark.parametrize(("user", "source_ns", "target_ns", "snapshot", "allowed"), [
    (SA_DEFAULT, "source-ns", "target-ns", False, True),  # the seed's RoleBinding
    (SA_DEFAULT, "source-ns", "target-ns", True, True),  # datavolumes/source covers snapshots
    (SA_DEFAULT, "other-ns", "target-ns", False, False),
    (auth.service_account("elsewhere", "default"), "source-ns", "target-ns", False, False),
    (who("anyone"), "same", "same", False, True),  # not a cross-namespace clone
    (SA_BUILDER, "dev", "target-ns", True, True),  # edit: CDI's edit has datavolumes/source
    (who("pat"), "dev", "target-ns", False, True),  # create pods
    (who("pat"), "dev", "target-ns", True, False),  # pods, but not CDI's "pvcs"
    (who("x", "devs"), "dev", "target-ns", False, False),  # view: neither
    (who("gina"), "dev", "target-ns", False, True),  # admin: datavolumes/source
    (auth.ADMIN, "any", "target-ns", True, True),
])
def test_can_clone(user: UserInfo, source_ns: str, target_ns: str, snapshot: bool,
                   allowed: bool) -> None:
    result = can_clone(POLICY, user.name, user.groups, source_ns, "golden", target_ns,
                       snapshot=snapshot)
    assert result == ((True, "") if allowed else (False, DENIED.format(user.name, source_ns)))


def test_can_clone_asks_about_the_named_source() -> None:
    policy = Policy([
        cluster_role("one", rule(["create"], [CDI], ["datavolumes/source"], names=["golden"])),
        binding("b", "ClusterRole", "one", User("u"), namespace="src"),
    ])
    assert can_clone(policy, "u", (), "src", "golden", "dst") == (True, "")
    assert can_clone(policy, "u", (), "src", "other", "dst")[0] is False


def clone_dv(namespace: str, source_ns: str | None, **annotations: str) -> dict[str, Any]:
    src = {"name": "golden"} | ({"namespace": source_ns} if source_ns else {})
    return {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "copy", "namespace": namespace, "annotations": annotations},
            "spec": {"source": {"pvc": src},
                     "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}


def test_clone_admission() -> None:
    sa = AdmissionRequest(SA_DEFAULT, POLICY)
    admission.admit(clone_dv("target-ns", "source-ns"), None, sa)
    admission.admit(clone_dv("target-ns", None), None, sa)
    with pytest.raises(errors.Invalid) as e:
        admission.admit(clone_dv("target-ns", "other"), None, sa)
    message = DENIED.format("system:serviceaccount:target-ns:default", "other")
    assert e.value.code == 422
    assert e.value.status()["message"] == message
    assert e.value.causes == [{"reason": "FieldValueInvalid", "message": message,
                               "field": "spec.source.PVC.namespace"}]
    # CDI lets pre-populated and static volumes through, since it never clones them;
    # our controllers do not honour those annotations, so they are no way around it.
    for annotation in ("storage.prePopulated", "storage.checkStaticVolume"):
        with pytest.raises(errors.Invalid):
            admission.admit(clone_dv("target-ns", "other", **{
                f"cdi.kubevirt.io/{annotation}": "x"}), None, sa)
    admission.admit(clone_dv("target-ns", "other"), None, AdmissionRequest(auth.ADMIN, Policy()))
    # A sourceRef is checked against what it resolves to, read beforehand
    # (admission.clone_source_of: tests/cdi/apiserver/test_clone_chain.py).
    by_ref = {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
              "metadata": {"name": "copy", "namespace": "target-ns"},
              "spec": {"sourceRef": {"kind": "DataSource", "name": "golden"},
                       "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}
    with pytest.raises(errors.Invalid) as e:
        admission.admit(by_ref, None, AdmissionRequest(
            SA_DEFAULT, POLICY, clone_source=CloneSource("pvc", "other", "golden")))
    assert e.value.status()["message"] == message
    admission.admit(by_ref, None, AdmissionRequest(
        SA_DEFAULT, POLICY, clone_source=CloneSource("pvc", "source-ns", "golden")))


# --- Privilege escalation -----------------------------------------------------------------------


def test_escalation_needs_the_permissions_granted() -> None:
    gina = AdmissionRequest(who("gina"), POLICY)  # admin in "dev"
    admission.admit(binding("v", "ClusterRole", "view", User("z"), namespace="dev"), None, gina)
    admission.admit(role("r", "dev", rule(["get"], [CDI], ["datavolumes"])), None, gina)
    with pytest.raises(errors.Forbidden) as e:
        admission.admit(binding("c", "ClusterRole", "cluster-admin", User("gina"),
                                namespace="dev"), None, gina)
    assert e.value.message == (
        'rolebindings.rbac.authorization.k8s.io "c" is forbidden: user "gina" '
        '(groups=["system:authenticated"]) is attempting to grant RBAC permissions not '
        'currently held:\n{APIGroups:["*"], Resources:["*"], Verbs:["*"]}\n'
        '{NonResourceURLs:["*"], Verbs:["*"]}')
    with pytest.raises(errors.Forbidden) as e:
        admission.admit(role("r", "dev", rule(["get", "list"], [""], ["nodes"])), None, gina)
    assert e.value.message.endswith(
        'not currently held:\n{APIGroups:[""], Resources:["nodes"], Verbs:["get" "list"]}')
    with pytest.raises(errors.Forbidden):  # admin in "dev" only
        admission.admit(binding("v", "ClusterRole", "view", User("z"), namespace="prod"),
                        None, gina)
    with pytest.raises(errors.NotFound):
        admission.admit(binding("v", "ClusterRole", "nope", User("z"), namespace="dev"),
                        None, gina)


def test_aggregation_rules_need_cluster_admin() -> None:
    policy = Policy([*OBJECTS, cluster_role("role-writer",
                                            rule(["create", "update"], [RBAC], ["clusterroles"])),
                     binding("w", "ClusterRole", "role-writer", User("w"))])
    with pytest.raises(errors.Forbidden) as e:
        admission.admit(cluster_role("agg", aggregate=[{}]), None,
                        AdmissionRequest(who("w"), policy))
    assert e.value.message == ('clusterroles.rbac.authorization.k8s.io "agg" is forbidden: '
                               "must have cluster-admin privileges to use the aggregationRule")
    admission.admit(cluster_role("agg", aggregate=[{}]), None,
                    AdmissionRequest(auth.ADMIN, Policy()))


def test_escalate_and_bind_verbs() -> None:
    policy = Policy([
        cluster_role("escalator", rule(["create", "escalate"], [RBAC], ["roles"])),
        cluster_role("binder", rule(["create"], [RBAC], ["rolebindings"]),
                     rule(["bind"], [RBAC], ["clusterroles"], names=["cluster-admin"])),
        cluster_role("cluster-admin", rule(["*"], ["*"], ["*"])),
        binding("e", "ClusterRole", "escalator", User("e"), namespace="n"),
        binding("b", "ClusterRole", "binder", User("b"), namespace="n"),
    ])
    admission.admit(role("big", "n", rule(["*"], ["*"], ["*"])), None,
                    AdmissionRequest(who("e"), policy))
    admission.admit(binding("x", "ClusterRole", "cluster-admin", User("b"), namespace="n"),
                    None, AdmissionRequest(who("b"), policy))
    with pytest.raises(errors.Forbidden):
        admission.admit(binding("x", "ClusterRole", "cluster-admin", User("b"),
                                namespace="m"), None, AdmissionRequest(who("b"), policy))


# --- Identities and tokens ----------------------------------------------------------------------


def test_identities() -> None:
    assert auth.service_account("ns", "sa") == UserInfo(
        "system:serviceaccount:ns:sa",
        ("system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"))
    assert auth.user("alice", ["dev", "dev", "ops"]) == UserInfo(
        "alice", ("dev", "ops", "system:authenticated"))
    assert auth.ADMIN == UserInfo("system:admin", ("system:masters", "system:authenticated"))
    assert auth.ADMIN.is_admin and not auth.user("alice").is_admin


def test_token_registry(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens.json"

    async def scenario() -> tuple[str, str, str]:
        registry = TokenRegistry(path)
        t1, secret1 = await registry.create(kind="User", name="alice", groups=("dev",))
        t2, secret2 = await registry.create(kind="ServiceAccount", name="default",
                                            namespace="target-ns")
        assert registry.authenticate(secret1) == auth.user("alice", ["dev"])
        assert registry.authenticate(secret2) == SA_DEFAULT
        assert registry.authenticate("nope") is None
        await registry.revoke(t1.id)
        with pytest.raises(errors.NotFound):
            await registry.revoke(t1.id)
        assert registry.authenticate(secret1) is None
        return secret1, secret2, t2.id

    secret1, secret2, id2 = asyncio.run(scenario())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert secret1 not in text and secret2 not in text
    assert auth.digest(secret2) in text
    reloaded = TokenRegistry(path)
    assert [t.id for t in reloaded.tokens()] == [id2]
    assert reloaded.authenticate(secret2) == SA_DEFAULT
    assert "sha256" not in reloaded.tokens()[0].public()


# --- Through a real API server ------------------------------------------------------------------


class RBACServer(ApiServer):
    """The test API server with default roles, a token registry and the validator."""

    def __init__(self, db: Path, tokens: Path) -> None:
        super().__init__(db)
        self.tokens = tokens

    async def _setup(self) -> None:
        self.store = SQLiteStore(self.db)
        await self.store.open()
        await rbac.ensure_defaults(self.store)
        app = create_app(self.store, token=self.token, admit=validation.validate,
                         tokens=TokenRegistry(self.tokens))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"


@pytest.fixture
def rbac_server(tmp_path: Path) -> Iterator[RBACServer]:
    server = RBACServer(tmp_path / "db.sqlite", tmp_path / "tokens.json")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def call(rbac_server: RBACServer) -> Iterator[Callable[..., requests.Response]]:
    session = requests.Session()

    def do(method: str, path: str, token: str = TOKEN, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return session.request(method, rbac_server.url + path, verify=True,
                               headers={"Authorization": f"Bearer {token}"}, **kwargs)

    yield do
    session.close()


DVS = "/apis/cdi.kubevirt.io/v1beta1/namespaces/{}/datavolumes"


def test_tokens_rbac_and_clone_admission_over_http(call: Callable[..., requests.Response],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = call("POST", auth.TOKENS_PATH, json={"user": "alice"})
    assert r.status_code == 201, r.text
    alice = r.json()["token"]
    r = call("POST", auth.TOKENS_PATH,
             json={"serviceAccount": {"namespace": "target-ns", "name": "default"}})
    sa = r.json()["token"]
    assert r.json()["user"] == "system:serviceaccount:target-ns:default"

    r = call("GET", DVS.format("default"), alice)
    assert (r.status_code, r.json()["message"]) == (403, (
        'datavolumes.cdi.kubevirt.io is forbidden: User "alice" cannot list resource '
        '"datavolumes" in API group "cdi.kubevirt.io" in the namespace "default"'))
    r = call("GET", DVS.format("default"), alice, params={"watch": "true"})
    assert r.status_code == 403 and "cannot watch resource" in r.json()["message"]
    assert call("GET", "/apis", alice).status_code == 200  # system:discovery
    assert call("GET", "/apis/cdi.kubevirt.io/v1beta1/storageprofiles", alice).status_code \
        == 200  # CDI's config-reader
    r = call("GET", auth.TOKENS_PATH, alice)
    assert (r.status_code, r.json()["message"]) == (
        403, 'forbidden: User "alice" cannot get path "/auth/v1/tokens"')
    assert call("GET", DVS.format("default"), "not-a-token").status_code == 401

    for obj in (CLONER, ALLOW_CLONE,
                binding("edit", "ClusterRole", "edit", ServiceAccount("default", "target-ns"),
                        namespace="target-ns")):
        path = ("/apis/rbac.authorization.k8s.io/v1/" +
                (f"namespaces/{obj['metadata']['namespace']}/" if obj["kind"] == "RoleBinding"
                 else "") + obj["kind"].lower() + "s")
        assert call("POST", path, json=obj).status_code == 201
    dv = clone_dv("target-ns", "source-ns")
    r = call("POST", DVS.format("target-ns"), sa, json=dv)
    assert r.status_code == 201, r.text
    dv["metadata"]["name"] = "copy2"
    dv["spec"]["source"]["pvc"]["namespace"] = "elsewhere"
    r = call("POST", DVS.format("target-ns"), sa, json=dv)
    assert (r.status_code, r.json()["reason"], r.json()["message"]) == (
        422, "Invalid", DENIED.format("system:serviceaccount:target-ns:default", "elsewhere"))
    assert call("POST", DVS.format("elsewhere"), TOKEN, json=datavolume("x", namespace=None)
                ).status_code == 201

    r = call("GET", auth.TOKENS_PATH)
    listed = r.json()["items"]
    assert [t["user"] for t in listed] == ["alice", "system:serviceaccount:target-ns:default"]
    assert all("token" not in t and "sha256" not in t for t in listed)
    assert alice not in r.text and sa not in r.text
    assert call("DELETE", f"{auth.TOKENS_PATH}/{listed[0]['id']}").status_code == 200
    assert call("GET", "/apis", alice).status_code == 401
    assert alice not in caplog.text and sa not in caplog.text
    assert call("GET", "/healthz", "").status_code == 200


@pytest.mark.parametrize(("body", "message"), [
    ({}, 'give either "user" or "serviceAccount"'),
    ({"user": "a", "serviceAccount": {"namespace": "n", "name": "s"}},
     'give either "user" or "serviceAccount"'),
    ({"user": ""}, "invalid user name"),
    ({"user": "system:serviceaccount:n:s"}, "are service accounts"),
    ({"user": "a", "groups": "g"}, '"groups" must be a list'),
    ({"serviceAccount": {"namespace": "N", "name": "s"}}, "must be a DNS-1123 label"),
    ({"serviceAccount": {"namespace": "n", "name": "s"}, "groups": ["g"]}, "takes no groups"),
])
def test_bad_token_requests(call: Callable[..., requests.Response], body: dict[str, Any],
                            message: str) -> None:
    r = call("POST", auth.TOKENS_PATH, json=body)
    assert r.status_code == 400 and message in r.json()["message"], r.text


def test_the_admin_token_is_not_restricted(rbac_server: RBACServer) -> None:
    r = requests.get(rbac_server.url + "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin",
                     headers=admin_auth(), timeout=30, verify=True)
    assert r.status_code == 200
    assert r.json()["aggregationRule"]["clusterRoleSelectors"] == [
        {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-admin": "true"}}]
