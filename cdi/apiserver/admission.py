"""Admission that depends on who asks: CDI's clone-source check and RBAC's escalation check.

``cdi.api.validation`` judges an object by itself.  Two rules also need the
requester and the authorizer, so the REST API calls :func:`admit` with an
:class:`AdmissionRequest` (Kubernetes hands webhooks ``request.userInfo`` the
same way) before validation, as mutating webhooks run before validating ones:

- **Clone authorization** (CDI's ``datavolume-mutate`` webhook, on create and
  update of a DataVolume): a clone from another namespace needs, for a PVC
  source, ``create`` on ``cdi.kubevirt.io/datavolumes/source`` (named as the
  source) or ``create pods`` in the source namespace; for a snapshot source,
  ``datavolumes/source`` or both ``pods`` and ``pvcs``.  The source is the
  DataVolume's own, or the claim or snapshot its ``sourceRef`` resolves to,
  through a DataSource that refers to another one too (:func:`clone_source_of`,
  the resolution the clone controller uses).  Refused with CDI's
  message "User <u> has insufficient permissions in clone source namespace
  <ns>" (``authorize_utils.go``) and 422: CDI's webhook answers
  ``toRejectedAdmissionResponse`` with ``Code: 422``, and kube-apiserver
  returns a webhook's own code (``webhookerrors.ToStatusErr`` raises only
  codes below 400 to 400).  DataVolumes being deleted, or annotated
  ``storage.prePopulated``/``storage.checkStaticVolume``, pass, as in CDI.
- **No privilege escalation** (kube-apiserver's RBAC storage): a Role or
  ClusterRole may be written only by someone who holds every rule in it (or
  may ``escalate``), a binding only by someone who holds the role's rules
  (or may ``bind`` it); an ``aggregationRule`` needs cluster-admin.

``system:masters`` passes both, as in Kubernetes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cdi.api import errors, sourceref
from cdi.api.kinds import CDI, RBAC
from cdi.apiserver.auth import UserInfo
from cdi.apiserver.rbac import (
    ALL,
    Attributes,
    Authorizer,
    Policy,
    Rule,
    quote,
    quote_list,
    rules_of,
)
from cdi.backends.port import Obj, ObjectStore

PRE_POPULATED = "cdi.kubevirt.io/storage.prePopulated"
CHECK_STATIC_VOLUME = "cdi.kubevirt.io/storage.checkStaticVolume"
CLONE_SOURCE_FIELD = "spec.source.PVC.namespace"  # CDI names this field for every source
FULL_AUTHORITY = (Rule(verbs=(ALL,), api_groups=(ALL,), resources=(ALL,)),
                  Rule(verbs=(ALL,), non_resource_urls=(ALL,)))


@dataclasses.dataclass(frozen=True)
class AdmissionRequest:
    """Who writes, and the authorizer to ask about them.

    ``clone_source`` is what a DataVolume clones, read beforehand with
    :func:`clone_source_of` (a ``sourceRef`` needs DataSources read); a
    DataVolume's own ``source.pvc``/``source.snapshot`` is checked without it.
    """

    user: UserInfo
    authorizer: Policy
    clone_source: sourceref.CloneSource | None = None


def admit(new: Obj, old: Obj | None, request: AdmissionRequest) -> None:
    """Refuse NEW (replacing OLD, None on create) if REQUEST's user may not write it."""
    kind = new.get("kind")
    if kind == "DataVolume":
        admit_clone(new, request)
    elif kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") and \
            not request.user.is_admin:
        _no_escalation(new, old, request.user, request.authorizer)


# --- Clone authorization ---------------------------------------------------------------------


def insufficient_permissions(user: str, namespace: str) -> str:
    return f"User {user} has insufficient permissions in clone source namespace {namespace}"


def can_clone(authorizer: Authorizer, user: str, groups: Sequence[str], source_namespace: str,
              source_name: str, target_namespace: str, *,
              snapshot: bool = False) -> tuple[bool, str]:
    """CDI's ``CanUserClonePVC`` (``CanUserCloneSnapshot`` with SNAPSHOT): may USER in
    GROUPS clone SOURCE_NAMESPACE/SOURCE_NAME into TARGET_NAMESPACE?  (allowed, reason)."""
    if source_namespace == target_namespace:
        return True, ""
    who = UserInfo(user, tuple(groups))

    def may_create(resource: str, subresource: str = "", group: str = "") -> bool:
        return authorizer.authorize(Attributes(who, "create", source_namespace, group, resource,
                                               subresource, source_name)).allowed

    if may_create("datavolumes", "source", CDI):
        return True, ""
    # CDI asks for "pvcs", not "persistentvolumeclaims": kept as CDI sends it.
    implicit = ("pods", "pvcs") if snapshot else ("pods",)
    if all(may_create(r) for r in implicit):
        return True, ""
    return False, insufficient_permissions(user, source_namespace)


async def clone_source_of(store: ObjectStore, obj: Obj) -> sourceref.CloneSource | None:
    """What OBJ, a DataVolume being written, clones: resolved through its ``sourceRef`` and
    the DataSource that one refers to exactly as the clone controller resolves it, so
    the check (and on Kubernetes the token) names the claim or snapshot it will copy.

    None when OBJ is no DataVolume, clones nothing, or its reference leads nowhere (a
    missing DataSource, a reference chain CDI refuses): the controller clones nothing
    then either, and on Kubernetes a clone across namespaces without a token is never
    started.
    """
    if obj.get("kind") != "DataVolume":
        return None

    async def datasource(namespace: str, name: str) -> Obj | None:
        try:
            return await store.get("DataSource", name, namespace)
        except errors.NotFound:
            return None

    try:
        return await sourceref.clone_source(obj, datasource)
    except sourceref.Unresolved:
        return None


def clone_refused(dv: Obj, reason: str) -> errors.Invalid:
    """The error of a refused clone, as CDI's webhook words and places it."""
    return errors.Invalid(reason, kind="DataVolume",
                          name=str((dv.get("metadata") or {}).get("name") or ""),
                          causes=[{"reason": "FieldValueInvalid", "message": reason,
                                   "field": CLONE_SOURCE_FIELD}])


def admit_clone(dv: Obj, request: AdmissionRequest) -> None:
    """CDI's ``AuthorizeUser`` on a DataVolume create or update; raises ``Invalid``."""
    meta = dv.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return
    namespace = str(meta.get("namespace") or "")
    source = request.clone_source or sourceref.named(
        (dv.get("spec") or {}).get("source") or {}, namespace)
    if source is None:
        return
    user = request.user
    allowed, reason = can_clone(request.authorizer, user.name, user.groups, source.namespace,
                                source.name, namespace, snapshot=source.snapshot)
    # CDI lets prePopulated/checkStaticVolume DataVolumes through because it never
    # clones them; the embedded controllers do not honour those annotations, so
    # they get the same check as any clone.
    if allowed:
        return
    raise clone_refused(dv, reason)


# --- Privilege escalation ----------------------------------------------------------------------


def _no_escalation(obj: Obj, old: Obj | None, user: UserInfo, policy: Policy) -> None:
    kind = str(obj["kind"])
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "") if kind in ("Role", "RoleBinding") else ""
    resource = kind.lower() + "s"
    if kind in ("Role", "ClusterRole"):
        # kube-apiserver asks with the request's name: none on create.
        if policy.authorize(Attributes(user, "escalate", namespace, RBAC, resource, "",
                                       name if old is not None else "")).allowed:
            return
        held, problems = policy.rules_for(user, namespace)
        _require(held, rules_of(obj), resource, name, user, problems)
        if kind == "ClusterRole" and obj.get("aggregationRule") is not None and \
                uncovered(held, FULL_AUTHORITY):
            raise _forbidden(resource, name,
                             "must have cluster-admin privileges to use the aggregationRule")
        return
    ref = obj.get("roleRef")
    if not isinstance(ref, dict):
        ref = {}
    ref_resource = "clusterroles" if ref.get("kind") == "ClusterRole" else "roles"
    if policy.authorize(Attributes(user, "bind", namespace, RBAC, ref_resource, "",
                                   str(ref.get("name") or ""))).allowed:
        return
    granted, problem = policy.role_ref_rules(ref, namespace)
    if problem:
        raise errors.NotFound(problem)
    held, problems = policy.rules_for(user, namespace)
    _require(held, list(granted), resource, name, user, problems)


def _require(held: Sequence[Rule], wanted: Sequence[Rule], resource: str, name: str,
             user: UserInfo, problems: list[str]) -> None:
    """kube-apiserver's ``ConfirmNoEscalation``: every wanted rule is held."""
    missing = uncovered(held, wanted)
    if not missing:
        return
    lines = sorted({r.compact() for r in compact(missing)})
    message = (f"user {quote(user.name)} (groups={quote_list(user.groups)}) is attempting to "
               "grant RBAC permissions not currently held:\n" + "\n".join(lines))
    if problems:
        message += f"; resolution errors: [{' '.join(problems)}]"
    raise _forbidden(resource, name, message)


def _forbidden(resource: str, name: str, message: str) -> errors.Forbidden:
    return errors.Forbidden(f"{resource}.{RBAC} {quote(name)} is forbidden: {message}",
                            kind=resource, name=name)


def breakdown(rule: Rule) -> list[Rule]:
    """``BreakdownRule``: one rule per group, resource, verb (and name, or URL and verb)."""
    each_name: list[tuple[str, ...]] = [(n,) for n in rule.resource_names] or [()]
    rules = [Rule(verbs=(v,), api_groups=(g,), resources=(r,), resource_names=names)
             for g in rule.api_groups for r in rule.resources for v in rule.verbs
             for names in each_name]
    rules += [Rule(verbs=(v,), non_resource_urls=(u,))
              for u in rule.non_resource_urls for v in rule.verbs]
    return rules


def covers(owner: Rule, sub: Rule) -> bool:
    """``ruleCovers``: OWNER allows everything SUB (a broken-down rule) allows."""
    def has_all(have: Sequence[str], want: Sequence[str]) -> bool:
        return ALL in have or all(w in have for w in want)

    def resource_covered(path: str) -> bool:
        if ALL in owner.resources or path in owner.resources:
            return True
        return "/" in path and "*/" + path.split("/", 1)[1] in owner.resources

    def url_covered(url: str) -> bool:
        return any(o == url or (o.endswith("*") and url.startswith(o.rstrip("*")))
                   for o in owner.non_resource_urls)

    if sub.resource_names:
        names = not owner.resource_names or all(n in owner.resource_names
                                                for n in sub.resource_names)
    else:
        names = not owner.resource_names
    return (has_all(owner.verbs, sub.verbs) and has_all(owner.api_groups, sub.api_groups)
            and all(resource_covered(r) for r in sub.resources)
            and all(url_covered(u) for u in sub.non_resource_urls) and names)


def uncovered(held: Sequence[Rule], wanted: Sequence[Rule]) -> list[Rule]:
    """``Covers``: the broken-down parts of WANTED that no rule in HELD covers."""
    return [sub for rule in wanted for sub in breakdown(rule)
            if not any(covers(owner, sub) for owner in held)]


def compact(rules: Sequence[Rule]) -> list[Rule]:
    """``CompactRules``: single-group, single-resource rules without names that differ
    only by verb become one rule."""
    out: list[Rule] = []
    index: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}
    for r in rules:
        simple = len(r.api_groups) == 1 and len(r.resources) == 1 and not r.resource_names
        key = (r.api_groups, r.resources)
        if simple and key in index:
            first = out[index[key]]
            out[index[key]] = dataclasses.replace(
                first, verbs=first.verbs + tuple(v for v in r.verbs if v not in first.verbs))
            continue
        if simple:
            index[key] = len(out)
        out.append(r)
    return out
