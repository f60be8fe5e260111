"""The shape of objects on the Kubernetes API, as far as the adapter must know it.

Pure functions and tables, apart from ``kube`` (which does the talking) so both
stay small: the kinds the adapter needs beyond ``cdi.api.kinds`` (the Lease of
leader election), which kinds have a ``status`` subresource, list items that
come without ``apiVersion``/``kind``, and what changed between what a watch had
seen and a fresh list (the events a relist after 410 Gone emits).
"""

from __future__ import annotations

from typing import Any

from cdi.api import errors
from cdi.api.kinds import BY_KIND, Kind
from cdi.backends.port import Obj, WatchEvent

ObjKey = tuple[str, str]

# Kinds the adapter needs beyond the shared table: leader election, and the apiserver's
# access reviews, APIService and webhook configurations (their CA bundles).
EXTRA_KINDS = {k.kind: k for k in (
    Kind("Lease", "coordination.k8s.io", "v1", "leases", True),
    Kind("SubjectAccessReview", "authorization.k8s.io", "v1", "subjectaccessreviews", False),
    Kind("APIService", "apiregistration.k8s.io", "v1", "apiservices", False),
    Kind("ValidatingWebhookConfiguration", "admissionregistration.k8s.io", "v1",
         "validatingwebhookconfigurations", False),
    Kind("MutatingWebhookConfiguration", "admissionregistration.k8s.io", "v1",
         "mutatingwebhookconfigurations", False),
)}
STATUS_SUBRESOURCE = frozenset({
    "DataVolume", "DataSource", "DataImportCron", "StorageProfile", "CDIConfig", "CDI",
    "PersistentVolumeClaim", "PersistentVolume", "Pod", "Service", "Namespace",
    "VolumeSnapshot", "VolumeSnapshotContent"})


def kind_of(name: Any) -> Kind:
    if isinstance(name, str):
        if name in BY_KIND:
            return BY_KIND[name]
        if name in EXTRA_KINDS:
            return EXTRA_KINDS[name]
    raise errors.BadRequest(f"unknown kind {name!r}")


def key_of(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def version_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def uid_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))


def typed(kind: Kind, obj: Obj) -> Obj:
    """List items of built-in kinds come without apiVersion and kind: put them back."""
    if obj.get("kind") == kind.kind and obj.get("apiVersion"):
        return obj
    rest = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    return {"apiVersion": kind.api_version, "kind": kind.kind, **rest}


def changes(known: dict[ObjKey, Obj], items: list[Obj]) -> list[WatchEvent]:
    """What happened between ``known`` and a new list of the same objects."""
    events: list[WatchEvent] = []
    seen: set[ObjKey] = set()
    for obj in items:
        k = key_of(obj)
        seen.add(k)
        old = known.get(k)
        if old is not None and uid_of(old) != uid_of(obj):  # deleted and made anew
            events.append(WatchEvent("DELETED", old))
            old = None
        if old is None:
            events.append(WatchEvent("ADDED", obj))
        elif version_of(old) != version_of(obj):
            events.append(WatchEvent("MODIFIED", obj))
    events.extend(WatchEvent("DELETED", obj) for key, obj in known.items() if key not in seen)
    return events
