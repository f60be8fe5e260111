"""What a write does to objects: the Kubernetes API server's rules, on SQLite.

Controllers are written against Kubernetes semantics, so the embedded store
keeps them: server-set metadata (uid, resourceVersion, creationTimestamp,
generation), optimistic concurrency on ``metadata.resourceVersion``,
``status`` written only through its own verb, finalizers holding a deleted
object until the last one is removed, and garbage collection of objects whose
owners are gone.  A ``Transaction`` applies one verb inside one SQLite
transaction and records the watch events it produced; the store commits,
then publishes them.

Details kept from Kubernetes:

- each changed object gets its own resourceVersion, so one ``delete`` that
  cascades yields one event per object, owner first;
- a write that changes nothing (the same spec, status and metadata) is not
  stored and keeps its resourceVersion, so a controller that rewrites an
  unchanged status does not wake itself up;
- ``metadata.uid`` in a write must match the stored one (``Conflict``
  otherwise: the object was deleted and recreated); ``creationTimestamp``,
  ``deletionTimestamp`` and ``generation`` are the server's and are kept;
- a dependent is collected when none of its owners is left alive (an owner
  that is being deleted does not count), like background deletion.

Everything here runs on the store's database thread and is synchronous.
"""

from __future__ import annotations

import copy
import datetime
import secrets
import uuid
from typing import Any

from cdi.api.errors import AlreadyExists, BadRequest, Conflict, NotFound
from cdi.api.kinds import BY_KIND, Kind
from cdi.backends.embedded.db import Database, Key
from cdi.backends.embedded.mergepatch import merge_patch
from cdi.backends.port import EventType, Obj, WatchEvent

# Kubernetes' alphabet for generateName suffixes: no vowels, no look-alikes.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SUFFIX_LENGTH = 5
_GENERATE_ATTEMPTS = 8
_SERVER_FIELDS = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


def kind_of(name: Any) -> Kind:
    if isinstance(name, str) and name in BY_KIND:
        return BY_KIND[name]
    raise BadRequest(f"unknown kind {name!r}")


def scope(kind: Kind, namespace: str | None) -> str:
    """The namespace part of a key: "" for cluster-scoped kinds."""
    if not kind.namespaced:
        return ""
    if not namespace:
        raise BadRequest(f"namespace is required for {kind.kind}")
    return namespace


def key_of(obj: Obj) -> Key:
    """The key of a stored object."""
    meta = obj["metadata"]
    return Key(obj["kind"], meta.get("namespace", ""), meta["name"])


def labels_of(obj: Obj) -> dict[str, str] | None:
    labels: dict[str, str] | None = obj["metadata"].get("labels")
    return labels


def now() -> str:
    """RFC 3339 in UTC with a ``Z``, to the second, as Kubernetes writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Transaction:
    """One verb's worth of changes in an open SQLite transaction.

    ``rv`` is the last resourceVersion handed out; ``events`` what watchers
    must see once the transaction commits, with each object's version.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.rv = db.resource_version()
        self.events: list[tuple[int, WatchEvent]] = []
        self.now = now()

    def create(self, obj: Obj) -> Obj:
        kind = kind_of(obj.get("kind"))
        if obj.setdefault("apiVersion", kind.api_version) != kind.api_version:
            raise BadRequest(f"apiVersion {obj['apiVersion']!r} does not match kind "
                             f"{kind.kind} (expected {kind.api_version!r})")
        meta = _metadata(obj)
        namespace = scope(kind, meta.get("namespace"))
        _set_namespace(meta, namespace)
        name = meta.get("name")
        if not name:
            name = self._generate_name(kind, namespace, meta.get("generateName"))
            meta["name"] = name
        elif self.db.get(Key(kind.kind, namespace, name)) is not None:
            raise AlreadyExists.of(kind.kind, name)
        for field in _SERVER_FIELDS:
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=self.now, generation=1)
        ordered = {"apiVersion": obj.pop("apiVersion"), "kind": obj.pop("kind"),
                   "metadata": obj.pop("metadata"), **obj}
        return self._save(Key(kind.kind, namespace, name), ordered, "ADDED")

    def replace(self, obj: Obj) -> Obj:
        kind, key, stored = self._target(obj)
        if "status" in stored:
            obj["status"] = copy.deepcopy(stored["status"])
        else:
            obj.pop("status", None)
        return self._update(kind, key, stored, obj, _expected_rv(obj))

    def replace_status(self, obj: Obj) -> Obj:
        kind, key, stored = self._target(obj)
        new = copy.deepcopy(stored)
        if obj.get("status") is not None:
            new["status"] = obj["status"]
        else:
            new.pop("status", None)
        return self._update(kind, key, stored, new, _expected_rv(obj))

    def patch(self, kind_name: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        if not isinstance(patch, dict):
            raise BadRequest("a merge patch must be a JSON object")
        kind = kind_of(kind_name)
        key = Key(kind.kind, scope(kind, namespace), name)
        stored = self._get(kind, key)
        new = merge_patch(stored, patch)
        return self._update(kind, key, stored, new, _expected_rv(patch))

    def delete(self, kind_name: str, name: str, namespace: str | None) -> Obj:
        kind = kind_of(kind_name)
        key = Key(kind.kind, scope(kind, namespace), name)
        return self._delete(key, self._get(kind, key))

    # -- internals ---------------------------------------------------------

    def _get(self, kind: Kind, key: Key) -> Obj:
        stored = self.db.get(key)
        if stored is None:
            raise NotFound.of(kind.kind, key.name)
        return stored

    def _target(self, obj: Obj) -> tuple[Kind, Key, Obj]:
        kind = kind_of(obj.get("kind"))
        meta = _metadata(obj)
        name = meta.get("name")
        if not name:
            raise BadRequest("metadata.name: Required value: name is required")
        key = Key(kind.kind, scope(kind, meta.get("namespace")), name)
        return kind, key, self._get(kind, key)

    def _generate_name(self, kind: Kind, namespace: str, prefix: str | None) -> str:
        if not prefix:
            raise BadRequest("metadata.name: Required value: name or generateName is required")
        for _ in range(_GENERATE_ATTEMPTS):
            name = prefix + "".join(secrets.choice(_SUFFIX_ALPHABET)
                                    for _ in range(_SUFFIX_LENGTH))
            if self.db.get(Key(kind.kind, namespace, name)) is None:
                return name
        raise AlreadyExists.of(kind.kind, name)

    def _update(self, kind: Kind, key: Key, stored: Obj, new: Obj, expected: Any) -> Obj:
        old_meta = stored["metadata"]
        if expected is not None and str(expected) != old_meta["resourceVersion"]:
            raise Conflict.of(kind.kind, key.name)
        meta = _metadata(new)
        if meta.get("uid") not in (None, old_meta["uid"]):
            raise Conflict(f"Precondition failed: UID in precondition: {meta['uid']}, "
                           f"UID in object meta: {old_meta['uid']}",
                           kind=kind.kind, name=key.name)
        new["apiVersion"], new["kind"] = stored["apiVersion"], stored["kind"]
        meta["name"] = key.name
        _set_namespace(meta, key.namespace)
        for field in _SERVER_FIELDS:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        spec_changed = new.get("spec") != stored.get("spec")
        meta["generation"] = old_meta.get("generation", 1) + (1 if spec_changed else 0)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == stored:
            return new
        if "deletionTimestamp" in meta and not meta.get("finalizers"):
            return self._remove(key, new)
        return self._save(key, new, "MODIFIED")

    def _delete(self, key: Key, obj: Obj) -> Obj:
        meta = obj["metadata"]
        if not meta.get("finalizers"):
            return self._remove(key, obj)
        if "deletionTimestamp" not in meta:
            meta["deletionTimestamp"] = self.now
            meta["deletionGracePeriodSeconds"] = 0
            self._save(key, obj, "MODIFIED")
            self._collect_dependents(meta["uid"])
        return obj

    def _remove(self, key: Key, obj: Obj) -> Obj:
        self._save(key, obj, "DELETED")
        self._collect_dependents(obj["metadata"]["uid"])
        return obj

    def _collect_dependents(self, owner_uid: str) -> None:
        for dependent in self.db.dependents(owner_uid):
            # Re-read: a deeper cascade may have changed or removed it already.
            current = self.db.by_uid(dependent["metadata"]["uid"])
            if current is None or "deletionTimestamp" in current["metadata"]:
                continue
            if not self._has_live_owner(current):
                self._delete(key_of(current), current)

    def _has_live_owner(self, obj: Obj) -> bool:
        for ref in obj["metadata"].get("ownerReferences") or ():
            owner = self.db.by_uid(ref["uid"])
            if owner is not None and "deletionTimestamp" not in owner["metadata"]:
                return True
        return False

    def _save(self, key: Key, obj: Obj, type_: EventType) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if type_ == "DELETED":
            self.db.delete(key, obj["metadata"]["uid"])
        else:
            self.db.put(key, obj)
        self.events.append((self.rv, WatchEvent(type_, copy.deepcopy(obj))))
        return obj


def _expected_rv(obj: Obj) -> Any:
    meta = obj.get("metadata")
    return meta.get("resourceVersion") if isinstance(meta, dict) else None


def _set_namespace(meta: dict[str, Any], namespace: str) -> None:
    if namespace:
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)


def _metadata(obj: Obj) -> dict[str, Any]:
    """``obj["metadata"]`` (created if missing), checked enough to be stored."""
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise BadRequest("metadata must be an object")
    for field in ("name", "generateName", "namespace"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            raise BadRequest(f"metadata.{field} must be a string")
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(v, str) for v in value.values())):
            raise BadRequest(f"metadata.{field} must map strings to strings")
    finalizers = meta.get("finalizers")
    if finalizers is not None and not (isinstance(finalizers, list) and all(
            isinstance(f, str) for f in finalizers)):
        raise BadRequest("metadata.finalizers must be a list of strings")
    refs = meta.get("ownerReferences")
    if refs is not None and not (isinstance(refs, list) and all(
            isinstance(r, dict) and isinstance(r.get("uid"), str) and r["uid"] for r in refs)):
        raise BadRequest("metadata.ownerReferences must be a list of objects with a uid")
    return meta
