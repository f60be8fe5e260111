"""DataSource controller: say whether a DataSource can be consumed, and from what.

A DataSource names a golden image by reference (reference 1.2, 6.5): a claim
(``spec.source.pvc``), a VolumeSnapshot (``spec.source.snapshot``) or, one
level deep, another DataSource (``spec.source.dataSource``).  Its ``Ready``
condition and ``status.source`` are what DataVolumes with a ``sourceRef`` and
DataImportCron rely on, so they follow CDI's rules and wording exactly:

- a claim is ready when it exists and has no DataVolume of the same name, or
  that DataVolume has Succeeded; a DataVolume not done gives its phase as the
  reason; neither gives ``NotFound``;
- a snapshot is ready when ``status.readyToUse`` is true;
- a reference is resolved once: a reference to itself, to another namespace, to
  a missing DataSource or to one that refers on again is an error reason
  (``cdi.api.sourceref``, which admission and the clone controller resolve with);
- ``status.source`` is the resolved source while Ready, else empty.

The dependents (claims, DataVolumes, snapshots, referenced DataSources) change
without the DataSource changing, and the runtime's mappers are synchronous, so
the controller keeps a reverse index from each dependent to the DataSources
whose last reconcile looked at it (compare ``StorageProfileController``'s
``_provisioners``).  The index is updated before the dependents are read, so
an event the index missed happened before the read and is seen by it.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable, Iterable

from cdi.api import errors, sourceref
from cdi.api.sourceref import REASON_NOT_FOUND
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.runtime import Key, Mapper, Result

log = logging.getLogger(__name__)

READY = "Ready"
# Reasons, as CDI's datasource-controller.go spells them (those of a reference that
# leads nowhere are sourceref's, which resolves references for every reader).
REASON_READY = "Ready"
REASON_NO_SOURCE = "NoSource"
REASON_SNAPSHOT_NOT_READY = "SnapshotNotReady"
MSG_READY = "DataSource is ready to be consumed"
MSG_NO_SOURCE = "No source PVC set"
MSG_PVC_NOT_FOUND = "PVC not found"
MSG_SNAPSHOT_NOT_FOUND = "Snapshot not found"
MSG_SNAPSHOT_NOT_READY = "Snapshot phase is not ready"
MSG_DV_PHASE = "Import DataVolume phase {phase}"

# What a DataSource depends on: ("claim" | "snapshot" | "dataSource", namespace, name).
# A claim and its DataVolume share the name, so both map through "claim".
Target = tuple[str, str, str]
_FIELDS = {"pvc": "claim", "snapshot": "snapshot", "dataSource": "dataSource"}
Readiness = tuple[str, str, str]  # condition status, reason, message


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def targets_of(source: Obj, namespace: str) -> set[Target]:
    """The dependents SOURCE (a ``spec.source``) names; a missing namespace is NAMESPACE."""
    found: set[Target] = set()
    for field, what in _FIELDS.items():
        ref = source.get(field)
        if isinstance(ref, dict) and ref.get("name"):
            found.add((what, ref.get("namespace") or namespace, ref["name"]))
    return found


def set_ready(conditions: list[Obj], readiness: Readiness, timestamp: str) -> list[Obj]:
    """CONDITIONS with Ready set as CDI's updateConditionState does.

    The heartbeat moves whenever status, reason or message change; the
    transition time only when the status does.  An unchanged condition is kept
    as it is, so a reconcile that finds nothing new writes nothing.
    """
    status, reason, message = readiness
    result = copy.deepcopy(conditions)
    cond = next((c for c in result if c.get("type") == READY), None)
    if cond is None:
        cond = {"type": READY}
        result.append(cond)
    if (cond.get("status"), cond.get("reason", ""), cond.get("message", "")) == readiness:
        return result
    if cond.get("status") != status:
        cond["status"] = status
        cond["lastTransitionTime"] = timestamp
    cond["lastHeartbeatTime"] = timestamp
    cond["reason"] = reason
    cond["message"] = message
    return result


class DataSourceController:
    name = "datasource"
    kind = "DataSource"

    def __init__(self, store: ObjectStore, *, clock: Callable[[], str] = now) -> None:
        self._store = store
        self._clock = clock
        self._targets: dict[Key, set[Target]] = {}
        self._referrers: dict[Target, set[Key]] = {}

    def watches(self) -> dict[str, Mapper]:
        return {"DataSource": self._mapper("dataSource"),
                "PersistentVolumeClaim": self._mapper("claim"),
                "DataVolume": self._mapper("claim"),
                "VolumeSnapshot": self._mapper("snapshot")}

    def _mapper(self, what: str) -> Mapper:
        def mapper(obj: Obj) -> Iterable[Key]:
            meta = obj.get("metadata", {})
            return sorted(self._referrers.get((what, meta.get("namespace", ""), meta["name"]),
                                              ()))
        return mapper

    def referrers(self, what: str, namespace: str, name: str) -> set[Key]:
        """The DataSources last seen depending on a dependent (for tests and debugging)."""
        return set(self._referrers.get((what, namespace, name), ()))

    def _index(self, key: Key, targets: set[Target]) -> None:
        for target in self._targets.pop(key, set()) - targets:
            keys = self._referrers.get(target)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._referrers[target]
        if targets:
            self._targets[key] = targets
            for target in targets:
                self._referrers.setdefault(target, set()).add(key)

    async def reconcile(self, key: Key) -> Result | None:
        ns, name = key
        try:
            ds = await self._store.get("DataSource", name, ns)
        except errors.NotFound:
            self._index(key, set())
            return None
        source: Obj = (ds.get("spec") or {}).get("source") or {}
        targets = targets_of(source, ns)
        self._index(key, targets)  # before reading what the targets name
        try:
            resolved = await sourceref.resolve(ds, self._datasource)
        except sourceref.Unresolved as e:
            log.info("[%s/%s] datasource: %s", ns, name, e.message)
            readiness: Readiness = ("False", e.reason, e.message)
            resolved = {}
        else:
            if resolved is not source:
                self._index(key, targets | targets_of(resolved, ns))
            readiness = await self._readiness(ns, resolved)
        old: Obj = ds.get("status") or {}
        new = dict(old)
        new["conditions"] = set_ready(old.get("conditions") or [], readiness, self._clock())
        # CDI keeps the resolved source only while Ready, and an empty one otherwise.
        new["source"] = copy.deepcopy(resolved) if readiness[0] == "True" else {}
        if new != old:
            updated = copy.deepcopy(ds)
            updated["status"] = new
            await self._store.replace_status(updated)
            if old.get("conditions") != new["conditions"]:
                log.info("[%s/%s] datasource: Ready=%s reason=%s", ns, name, *readiness[:2])
        return None

    async def _datasource(self, ns: str, name: str) -> Obj | None:
        return await self._get("DataSource", name, ns)

    async def _readiness(self, ns: str, source: Obj) -> Readiness:
        if isinstance(source.get("pvc"), dict):
            return await self._claim_readiness(ns, source["pvc"])
        if isinstance(source.get("snapshot"), dict):
            return await self._snapshot_readiness(ns, source["snapshot"])
        return ("False", REASON_NO_SOURCE, MSG_NO_SOURCE)

    async def _claim_readiness(self, ns: str, ref: Obj) -> Readiness:
        claim_ns = ref.get("namespace") or ns
        claim_name = ref.get("name") or ""
        pvc = await self._get("PersistentVolumeClaim", claim_name, claim_ns)
        dv = await self._get("DataVolume", claim_name, claim_ns)
        if dv is None:
            if pvc is None:
                return ("False", REASON_NOT_FOUND, MSG_PVC_NOT_FOUND)
            return ("True", REASON_READY, MSG_READY)
        phase = str((dv.get("status") or {}).get("phase") or "")
        if phase == "Succeeded":
            return ("True", REASON_READY, MSG_READY)
        return ("False", phase, MSG_DV_PHASE.format(phase=phase))

    async def _snapshot_readiness(self, ns: str, ref: Obj) -> Readiness:
        snapshot = await self._get("VolumeSnapshot", ref.get("name") or "",
                                   ref.get("namespace") or ns)
        if snapshot is None:
            return ("False", REASON_NOT_FOUND, MSG_SNAPSHOT_NOT_FOUND)
        if (snapshot.get("status") or {}).get("readyToUse") is True:
            return ("True", REASON_READY, MSG_READY)
        return ("False", REASON_SNAPSHOT_NOT_READY, MSG_SNAPSHOT_NOT_READY)

    async def _get(self, kind: str, name: str, ns: str) -> Obj | None:
        if not name:
            return None
        try:
            return await self._store.get(kind, name, ns)
        except errors.NotFound:
            return None
