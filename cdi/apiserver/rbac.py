"""Kubernetes RBAC: may this identity do this verb on this resource?

The API server asks on every request of an identity outside
``system:masters`` (:func:`middleware`), and CDI's admission asks the same
question about a clone's source namespace (:func:`can_clone`), as CDI's webhook
sends SubjectAccessReviews.  The answer follows Kubernetes' RBAC authorizer
(``plugin/pkg/auth/authorizer/rbac``):

- a request becomes :class:`Attributes` as kube-apiserver's RequestInfo makes
  them: ``POST`` create, ``PUT`` update, ``PATCH`` patch, ``DELETE`` delete
  (deletecollection without a name), ``GET`` get, list without a name, watch
  with ``?watch=true``; a ``fieldSelector=metadata.name=x`` names the object
  of a list or watch; ``/api/v1/namespaces/x`` is in namespace ``x``; paths
  outside resources (``/version``, ``/apis``) are non-resource requests;
- ClusterRoleBindings apply everywhere, RoleBindings in their namespace (to a
  Role there, or to a ClusterRole's rules in that namespace only); subjects
  are Users, Groups and ServiceAccounts (namespace defaulting to the
  binding's);
- a rule allows when verb, API group, resource (``res/sub``, or ``*/sub``),
  resourceName (if it lists any) match, or verb and non-resource URL (``*``
  suffix) do; ``*`` matches anything;
- a ClusterRole with an ``aggregationRule`` has the union of the rules of the
  ClusterRoles its selectors match (recursively), whatever its own ``rules``
  say: Kubernetes' aggregation controller overwrites them with that union;
- a binding whose role is missing grants nothing and adds the reason
  (``RBAC: clusterrole.rbac.authorization.k8s.io "x" not found``) to the 403.

Policy objects are read from the store for each request (:func:`load`), so a
``cdi apply`` of a RoleBinding counts at once.  Admission of RBAC objects
(privilege-escalation checks) and of cloning DataVolumes is in
:mod:`cdi.apiserver.admission`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cdi.api import errors, rbac_defaults
from cdi.api.kinds import RBAC
from cdi.apiserver import auth, paths
from cdi.apiserver.auth import UserInfo
from cdi.apiserver.query import parse_field_selector
from cdi.backends.embedded.selectors import Op, Requirement, Selector
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

ALL = "*"
KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete",
          "GET": "get", "HEAD": "get"}


def quote(text: str) -> str:
    """A string as Go's ``%q`` writes it (for the ASCII names Kubernetes allows)."""
    return json.dumps(text, ensure_ascii=False)


def quote_list(items: Sequence[str]) -> str:
    """A list as Go's ``%q`` writes a ``[]string``: ``["a" "b"]``."""
    return "[" + " ".join(quote(i) for i in items) + "]"


# --- Requests ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What is asked: Kubernetes' ``authorizer.Attributes``.  An empty RESOURCE
    makes it a non-resource request for PATH."""

    user: UserInfo
    verb: str
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""

    @property
    def resource_request(self) -> bool:
        return bool(self.resource)


def attributes(method: str, path: str, query: Mapping[str, str], user: UserInfo) -> Attributes:
    """The attributes of a request, as kube-apiserver's RequestInfoFactory makes them.

    Raises ``NotFound`` for a resource path the server does not have.
    """
    segments = path.strip("/").split("/")
    if not ((segments[0] == "api" and len(segments) >= 3)
            or (segments[0] == "apis" and len(segments) >= 4)):
        return Attributes(user, method.lower(), path=path)
    target = paths.resolve(path)
    if isinstance(target, paths.GroupVersion):  # pragma: no cover - excluded by the lengths
        return Attributes(user, method.lower(), path=path)
    verb = _VERBS.get(method, method.lower())
    name = target.name or ""
    if target.name is None:
        if verb == "get":
            verb = "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
            name = _selected_name(query.get("fieldSelector", ""))
        elif verb == "delete":
            verb = "deletecollection"
    namespace = target.namespace or ""
    if target.kind.kind == "Namespace" and target.name:
        namespace = target.name
    return Attributes(user, verb, namespace, target.kind.group, target.kind.plural,
                      target.subresource or "", name, path)


def _selected_name(selector: str) -> str:
    try:
        terms = parse_field_selector(selector)
    except errors.APIError:
        return ""
    return next((t.value for t in terms if t.field == "metadata.name" and t.equal), "")


# --- Rules --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """A PolicyRule."""

    verbs: tuple[str, ...] = ()
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, obj: Any) -> Rule | None:
        """The rule in a PolicyRule object, or None if it is not one."""
        if not isinstance(obj, dict):
            return None

        def strings(key: str) -> tuple[str, ...]:
            value = obj.get(key) or []
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) \
                else ()

        return cls(strings("verbs"), strings("apiGroups"), strings("resources"),
                   strings("resourceNames"), strings("nonResourceURLs"))

    def allows(self, a: Attributes) -> bool:
        """``RuleAllows``."""
        if not (ALL in self.verbs or a.verb in self.verbs):
            return False
        if not a.resource_request:
            return any(u == ALL or u == a.path or (u.endswith("*") and
                                                   a.path.startswith(u.rstrip("*")))
                       for u in self.non_resource_urls)
        combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        return ((ALL in self.api_groups or a.api_group in self.api_groups)
                and any(r in (ALL, combined) or (a.subresource and r == f"*/{a.subresource}")
                        for r in self.resources)
                and (not self.resource_names or a.name in self.resource_names))

    def compact(self) -> str:
        """Kubernetes' ``CompactString``: ``{APIGroups:["x"], Resources:["y"], Verbs:["get"]}``."""
        parts = [f"{label}:{quote_list(values)}" for label, values in (
            ("APIGroups", self.api_groups), ("Resources", self.resources),
            ("NonResourceURLs", self.non_resource_urls), ("ResourceNames", self.resource_names),
            ("Verbs", self.verbs)) if values]
        return "{" + ", ".join(parts) + "}"


def rules_of(obj: Obj) -> tuple[Rule, ...]:
    rules = obj.get("rules") or []
    if not isinstance(rules, list):
        return ()
    return tuple(r for r in map(Rule.parse, rules) if r is not None)


def selector(obj: Any) -> Selector | None:
    """A LabelSelector object (matchLabels, matchExpressions) as a Selector; None if invalid.
    The empty selector matches everything, as in Kubernetes."""
    if not isinstance(obj, dict):
        return None
    match_labels = obj.get("matchLabels") or {}
    if not isinstance(match_labels, dict):
        return None
    requirements = [Requirement(str(k), Op.EQUALS, frozenset([str(v)]))
                    for k, v in match_labels.items()]
    ops = {"In": Op.IN, "NotIn": Op.NOT_IN, "Exists": Op.EXISTS,
           "DoesNotExist": Op.DOES_NOT_EXIST}
    for e in obj.get("matchExpressions") or []:
        op = ops.get(str(e.get("operator"))) if isinstance(e, dict) else None
        if op is None or not isinstance(e.get("key"), str):
            return None
        requirements.append(Requirement(e["key"], op,
                                        frozenset(str(v) for v in e.get("values") or [])))
    return Selector(tuple(requirements))


# --- The policy --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authorizer(Protocol):
    def authorize(self, attributes: Attributes) -> Decision: ...


class Policy:
    """The RBAC objects at one moment, and the answers they give (an :class:`Authorizer`)."""

    def __init__(self, objects: Iterable[Obj] = ()) -> None:
        self._cluster_roles: dict[str, Obj] = {}
        self._roles: dict[tuple[str, str], Obj] = {}
        self._cluster_bindings: list[Obj] = []
        self._bindings: dict[str, list[Obj]] = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
            kind = obj.get("kind")
            if kind == "ClusterRole":
                self._cluster_roles[name] = obj
            elif kind == "Role":
                self._roles[(namespace, name)] = obj
            elif kind == "ClusterRoleBinding":
                self._cluster_bindings.append(obj)
            elif kind == "RoleBinding":
                self._bindings.setdefault(namespace, []).append(obj)
        self._aggregated: dict[str, tuple[Rule, ...]] = {}

    def authorize(self, attributes: Attributes) -> Decision:
        if attributes.user.is_admin:  # Kubernetes' privileged-group authorizer
            return Decision(True)
        problems: list[str] = []
        for rules, problem in self._visit(attributes.user, attributes.namespace):
            if problem:
                problems.append(problem)
            elif any(r.allows(attributes) for r in rules):
                return Decision(True)
        return Decision(False, "RBAC: " + _aggregate(problems) if problems else "")

    def rules_for(self, user: UserInfo, namespace: str) -> tuple[list[Rule], list[str]]:
        """Every rule USER holds in NAMESPACE ("" for cluster-wide), and why some are
        missing (bindings to roles that do not exist)."""
        rules: list[Rule] = []
        problems: list[str] = []
        for found, problem in self._visit(user, namespace):
            rules.extend(found)
            if problem:
                problems.append(problem)
        return rules, problems

    def role_ref_rules(self, ref: Any, namespace: str) -> tuple[tuple[Rule, ...], str]:
        """The rules a binding's roleRef grants, or a reason why none
        (Kubernetes' ``GetRoleReferenceRules``)."""
        ref = ref if isinstance(ref, dict) else {}
        kind, name = ref.get("kind"), str(ref.get("name") or "")
        if kind == "ClusterRole":
            if name not in self._cluster_roles:
                return (), f"clusterrole.{RBAC} {quote(name)} not found"
            return self.cluster_role_rules(name), ""
        if kind == "Role":
            role = self._roles.get((namespace, name))
            if role is None:
                return (), f"role.{RBAC} {quote(name)} not found"
            return rules_of(role), ""
        return (), f"unsupported role reference kind: {quote(str(kind or ''))}"

    def cluster_role_rules(self, name: str) -> tuple[Rule, ...]:
        """A ClusterRole's rules; an aggregated role's are those of the roles it selects."""
        if name not in self._aggregated:
            self._aggregated[name] = self._cluster_role_rules(name, frozenset())
        return self._aggregated[name]

    def _cluster_role_rules(self, name: str, seen: frozenset[str]) -> tuple[Rule, ...]:
        role = self._cluster_roles.get(name) or {}
        aggregation = role.get("aggregationRule")
        if aggregation is None:
            return rules_of(role)
        selectors = aggregation.get("clusterRoleSelectors") if isinstance(aggregation, dict) \
            else None
        found: list[Rule] = []
        for term in selectors if isinstance(selectors, list) else []:
            s = selector(term)
            if s is None:  # Kubernetes' controller cannot parse it either: nothing gathered
                continue
            for other in sorted(self._cluster_roles):
                labels = (self._cluster_roles[other].get("metadata") or {}).get("labels")
                if other == name or other in seen or not s.matches(labels or {}):
                    continue
                for r in self._cluster_role_rules(other, seen | {name}):
                    if r not in found:
                        found.append(r)
        return tuple(found)

    def _visit(self, user: UserInfo, namespace: str) -> Iterator[tuple[tuple[Rule, ...], str]]:
        """(rules, problem) of each binding that applies to USER, cluster-wide first."""
        for binding in sorted(self._cluster_bindings, key=_name):
            if _applies(binding, user, ""):
                yield self.role_ref_rules(binding.get("roleRef"), "")
        if namespace:
            for binding in sorted(self._bindings.get(namespace, []), key=_name):
                if _applies(binding, user, namespace):
                    yield self.role_ref_rules(binding.get("roleRef"), namespace)


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _applies(binding: Obj, user: UserInfo, namespace: str) -> bool:
    """Whether a subject of BINDING (in NAMESPACE, "" for a ClusterRoleBinding) is USER."""
    subjects = binding.get("subjects") or []
    for s in subjects if isinstance(subjects, list) else []:
        if not isinstance(s, dict):
            continue
        kind, name = s.get("kind"), s.get("name")
        if kind == "User" and name == user.name:
            return True
        if kind == "Group" and name in user.groups:
            return True
        if kind == "ServiceAccount":
            sa_namespace = s.get("namespace") or namespace
            if sa_namespace and user.name == f"{auth.SERVICE_ACCOUNT_PREFIX}{sa_namespace}:{name}":
                return True
    return False


def _aggregate(problems: list[str]) -> str:
    """Kubernetes' ``utilerrors.NewAggregate(...).Error()``."""
    return problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]"


async def load(store: ObjectStore) -> Policy:
    """The policy as it is in STORE now."""
    objects: list[Obj] = []
    for kind in KINDS:
        objects.extend((await store.list(kind)).items)
    return Policy(objects)


async def ensure_defaults(store: ObjectStore) -> None:
    """Create the default roles and bindings (:mod:`cdi.api.rbac_defaults`) that are
    missing; existing ones are left as they are."""
    created = 0
    for obj in rbac_defaults.DEFAULTS:
        try:
            await store.create(copy.deepcopy(obj))
        except errors.AlreadyExists:
            continue
        created += 1
    log.info("RBAC defaults ensured created=%d total=%d", created, len(rbac_defaults.DEFAULTS))


# --- Refusals and the middleware ---------------------------------------------------------------


class Forbidden(errors.Forbidden):
    """A 403 whose ``details`` carry the group as Kubernetes' do."""

    def __init__(self, message: str, *, group: str = "", resource: str = "",
                 name: str = "") -> None:
        super().__init__(message, kind=resource, name=name)
        self.group = group

    def status(self) -> dict[str, Any]:
        status = super().status()
        if self.group:
            status.setdefault("details", {})["group"] = self.group
        return status


def forbidden_message(a: Attributes) -> str:
    """kube-apiserver's ``forbiddenMessage``."""
    who = quote(a.user.name)
    if not a.resource_request:
        return f"User {who} cannot {a.verb} path {quote(a.path)}"
    resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    where = f"in the namespace {quote(a.namespace)}" if a.namespace else "at the cluster scope"
    return (f"User {who} cannot {a.verb} resource {quote(resource)} in API group "
            f"{quote(a.api_group)} {where}")


def forbidden(a: Attributes, reason: str = "") -> Forbidden:
    """The 403 kube-apiserver answers (``responsewriters.Forbidden``, ``NewForbidden``)."""
    message = forbidden_message(a) + (f": {reason}" if reason else "")
    if not a.resource_request:
        return Forbidden(f"forbidden: {message}")
    qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
    named = f"{qualified} {quote(a.name)}" if a.name else qualified
    return Forbidden(f"{named} is forbidden: {message}", group=a.api_group,
                     resource=a.resource, name=a.name)


POLICY: web.RequestKey[Policy] = web.RequestKey("rbac_policy", Policy)


def policy_of(request: web.Request) -> Policy:
    """The policy the request was authorized with; an empty one for the admin, who
    needs none (``system:masters`` is allowed everything)."""
    return request.get(POLICY) or Policy()


def middleware(store: ObjectStore) -> Middleware:
    """Authorize every request of an identity outside ``system:masters``.

    Must run after :func:`cdi.apiserver.auth.middleware`.  Paths under
    ``/auth/`` (the token endpoint) are for ``system:masters`` only: no rule
    grants them.
    """

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        user = auth.user_of(request)
        if user.is_admin or (request.method, request.path) in auth.UNAUTHENTICATED:
            return await handler(request)
        asked = attributes(request.method, request.path, request.query, user)
        if request.path.startswith(auth.ADMIN_ONLY_PREFIX):
            raise forbidden(asked)
        policy = await load(store)
        decision = policy.authorize(asked)
        if not decision.allowed:
            raise forbidden(asked, decision.reason)
        request[POLICY] = policy
        return await handler(request)

    return authorize
