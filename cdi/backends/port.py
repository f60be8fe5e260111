"""The port the controllers and the REST API use to reach objects.

Both adapters implement it: ``embedded`` (SQLite, in ``cdi serve``) and, later,
``kube`` (the Kubernetes API).  Objects are plain dicts shaped exactly like
Kubernetes objects (``apiVersion``, ``kind``, ``metadata``, ``spec``,
``status``); typed views live in ``cdi.api``.  Errors are ``cdi.api.errors``
(``NotFound``, ``AlreadyExists``, ``Conflict``, ``Gone``, ``BadRequest``).

Semantics every adapter keeps, as Kubernetes does:

- ``create`` sets ``metadata.uid`` (uuid4), ``resourceVersion`` (a decimal
  string, increasing across the whole store), ``creationTimestamp``
  (RFC 3339, UTC, ``Z``) and ``generation`` = 1; it honours
  ``metadata.generateName``; a namespaced kind needs ``metadata.namespace``;
  ``status`` given on create is kept.
- ``replace`` writes the whole object but never its ``status`` (kept from the
  stored object); ``replace_status`` writes only ``status``.  Both fail with
  ``Conflict`` if ``metadata.resourceVersion`` is set and differs from the
  stored one.  ``generation`` grows by one when ``spec`` changes.  ``uid``,
  ``creationTimestamp`` and ``deletionTimestamp`` cannot be changed.
- ``patch`` applies a JSON merge patch (RFC 7386) to the stored object,
  including ``status`` when the patch has one, with the same rules.
- ``delete`` of an object with finalizers sets ``deletionTimestamp`` and
  returns it; it goes when the last finalizer is removed.  Otherwise it is
  removed at once.  Either way, objects whose ``ownerReferences`` name its uid
  are deleted too (cascading, like Kubernetes' background deletion).
- ``watch`` yields every change after ``resource_version`` (``ADDED``,
  ``MODIFIED``, ``DELETED`` with the object as it then was, in order); without
  ``resource_version`` it starts from now.  A version older than the
  adapter's retained history raises ``Gone``.  ``list`` returns the store's
  current ``resourceVersion`` so callers can list, then watch from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: Obj


@dataclasses.dataclass(frozen=True)
class ObjectList:
    items: list[Obj]
    resource_version: str


class ObjectStore(Protocol):
    async def get(self, kind: str, name: str, namespace: str | None = None) -> Obj: ...

    async def list(self, kind: str, namespace: str | None = None, *,
                   label_selector: str | None = None) -> ObjectList: ...

    async def create(self, obj: Obj) -> Obj: ...

    async def replace(self, obj: Obj) -> Obj: ...

    async def replace_status(self, obj: Obj) -> Obj: ...

    async def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj: ...

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj: ...

    def watch(self, kind: str, namespace: str | None = None, *,
              resource_version: str | None = None,
              label_selector: str | None = None) -> AsyncIterator[WatchEvent]: ...
