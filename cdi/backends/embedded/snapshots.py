"""The embedded snapshot controller: VolumeSnapshots of ``local-reflink`` volumes.

It plays the part of the CSI external-snapshotter and driver: a VolumeSnapshot
of a claim of the reflink class becomes a reflink copy of the volume (constant
time, no data copied), a cluster-scoped VolumeSnapshotContent that records it,
and ``status.readyToUse``.  Deleting the snapshot deletes its content and data
(``deletionPolicy: Delete``; ``Retain`` keeps them).  A snapshot of another
class, or with a class of another driver, gets CSI's error in its status.
"""

from __future__ import annotations

import asyncio
import datetime
import logging

from cdi.api import errors
from cdi.backends.embedded import reflink
from cdi.backends.embedded.storage import (
    REFLINK_PROVISIONER,
    RETRY_INTERVAL,
    Volumes,
    event,
    watch_all,
)
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT_CLASS = "snapshot.storage.kubernetes.io/is-default-class"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SnapshotController:
    def __init__(self, store: ObjectStore, volumes: Volumes) -> None:
        self._store = store
        self._volumes = volumes
        self._lock = asyncio.Lock()
        self._retry: set[tuple[str, str]] = set()  # snapshots waiting on their claim

    async def run(self) -> None:
        retry = asyncio.create_task(self._retry_loop())
        try:
            await self._watch()
        finally:
            retry.cancel()

    async def _retry_loop(self) -> None:
        """A snapshot whose claim was missing or not bound is tried again each second."""
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            for ns, name in list(self._retry):
                self._retry.discard((ns, name))
                try:
                    snap = await self._store.get("VolumeSnapshot", name, ns)
                except errors.NotFound:
                    continue
                await self._handle("MODIFIED", snap)

    async def _watch(self) -> None:
        await watch_all(self._store, "VolumeSnapshot", self._handle)

    async def _handle(self, event_type: str, snap: Obj) -> None:
        async with self._lock:
            try:
                if event_type == "DELETED":
                    await self._delete(snap)
                elif not (snap.get("status") or {}).get("readyToUse"):
                    await self._take(snap)
            except errors.APIError as e:
                log.info("SNAPSHOT %s: %s", snap["metadata"]["name"], e)

    async def _error(self, snap: Obj, message: str) -> None:
        meta = snap["metadata"]
        current = ((snap.get("status") or {}).get("error") or {}).get("message")
        if current == message:
            return
        await self._store.patch("VolumeSnapshot", meta["name"], meta["namespace"], {
            "status": {"readyToUse": False, "error": {"message": message, "time": _now()}}})
        await event(self._store, snap, reason="SnapshotCreationFailed", message=message)

    async def _class(self, snap: Obj) -> Obj | None:
        name = snap["spec"].get("volumeSnapshotClassName")
        if name:
            try:
                return await self._store.get("VolumeSnapshotClass", name)
            except errors.NotFound:
                return None
        for c in (await self._store.list("VolumeSnapshotClass")).items:
            if c["metadata"].get("annotations", {}).get(DEFAULT_SNAPSHOT_CLASS) == "true" and \
                    c.get("driver") == REFLINK_PROVISIONER:
                return c
        return None

    async def _take(self, snap: Obj) -> None:
        meta = snap["metadata"]
        ns, name = meta["namespace"], meta["name"]
        source = snap["spec"].get("source", {})
        claim_name = source.get("persistentVolumeClaimName")
        if not claim_name:
            await self._error(snap, "only snapshots of a persistentVolumeClaimName are supported")
            return
        try:
            claim = await self._store.get("PersistentVolumeClaim", claim_name, ns)
        except errors.NotFound:
            self._retry.add((ns, name))
            await self._error(snap, f'failed to get input parameters to create snapshot {name}: '
                                    f'persistentvolumeclaim "{claim_name}" not found')
            return
        if claim.get("status", {}).get("phase") != "Bound":
            self._retry.add((ns, name))
            await self._error(snap, f'the source claim "{claim_name}" is not bound')
            return
        pv = await self._store.get("PersistentVolume", claim["spec"]["volumeName"])
        driver = (pv["spec"].get("csi") or {}).get("driver")
        cls = await self._class(snap)
        if cls is None:
            await self._error(snap, "failed to get input parameters to create snapshot: "
                                    "no VolumeSnapshotClass for the volume's driver")
            return
        if driver != cls.get("driver"):
            await self._error(snap, f"the volume's driver {driver or 'none (not a CSI volume)'} "
                                    f"is not the snapshot class's {cls.get('driver')}")
            return
        block = claim["spec"].get("volumeMode") == "Block"
        content_name = f"snapcontent-{meta['uid']}"
        try:
            self._volumes.snapshot(pv["metadata"]["name"], content_name, block=block)
        except OSError as e:
            reflink.remove(self._volumes.snapshot_path(content_name, block=block))
            await self._error(snap, f"cannot take the snapshot: {e.strerror or e}")
            return
        size = claim["status"]["capacity"]["storage"]
        content: Obj = {
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": content_name},
            "spec": {"driver": cls["driver"],
                     "deletionPolicy": cls.get("deletionPolicy", "Delete"),
                     "source": {"volumeHandle": pv["metadata"]["name"]},
                     "sourceVolumeMode": "Block" if block else "Filesystem",
                     "volumeSnapshotClassName": cls["metadata"]["name"],
                     "volumeSnapshotRef": {"apiVersion": "snapshot.storage.k8s.io/v1",
                                           "kind": "VolumeSnapshot", "name": name,
                                           "namespace": ns, "uid": meta["uid"]}},
            "status": {"readyToUse": True, "snapshotHandle": content_name,
                       "restoreSize": size, "creationTime": _now()},
        }
        try:
            await self._store.create(content)
        except errors.AlreadyExists:
            pass
        await self._store.patch("VolumeSnapshot", name, ns, {"status": {
            "boundVolumeSnapshotContentName": content_name, "readyToUse": True,
            "restoreSize": size, "creationTime": _now(), "error": None}})
        log.info("SNAPSHOT %s/%s of %s taken as %s", ns, name, claim_name, content_name)

    async def _delete(self, snap: Obj) -> None:
        content_name = (snap.get("status") or {}).get("boundVolumeSnapshotContentName")
        if not content_name:
            return
        try:
            content = await self._store.get("VolumeSnapshotContent", content_name)
        except errors.NotFound:
            return
        if content["spec"].get("deletionPolicy", "Delete") != "Delete":
            return
        block = content["spec"].get("sourceVolumeMode") == "Block"
        reflink.remove(self._volumes.snapshot_path(content_name, block=block))
        try:
            await self._store.delete("VolumeSnapshotContent", content_name)
        except errors.NotFound:
            pass
        log.info("SNAPSHOT %s deleted with its data", content_name)
