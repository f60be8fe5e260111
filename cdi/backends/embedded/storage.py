"""The embedded provisioner: binds PersistentVolumeClaims to local volumes.

It plays the part a CSI provisioner plays on a cluster, and only that: for a
claim of a local storage class it makes a volume in the data dir (a directory
for ``Filesystem``, a sparse raw file of the exact size for ``Block``), creates
the PersistentVolume and binds the claim.  ``WaitForFirstConsumer`` classes
wait until a pod using the claim is scheduled (the pod runner sets
``volume.kubernetes.io/selected-node``).  Deleting a claim deletes its volume.
Storage classes come from ``storage-classes.json`` in the data dir, written
with the defaults on first start.

The ``local-reflink`` class, offered when its root can share extents (XFS
with reflink, btrfs; ``reflink.py``), also provisions claims whose
``dataSource`` is another claim of the class (a CSI clone) or a VolumeSnapshot
(a restore): the new volume is a reflink copy, made in constant time.  Its
volumes live under the reflink root and are linked from the volume dir, so
every other part finds them where it finds any volume.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cdi.api import errors
from cdi.backends.embedded import reflink
from cdi.backends.port import Obj, ObjectStore
from importer import units

log = logging.getLogger(__name__)

PROVISIONER = "cdi.kubevirt.io/local"
REFLINK_PROVISIONER = "cdi.kubevirt.io/local-reflink"
REFLINK_CLASS = "local-reflink"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
NODE_NAME = "localhost"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
PROVISIONING_ERROR = "embedded.cdi.kubevirt.io/provisioning-error"
RETRY_INTERVAL = 1.0

DEFAULT_CLASSES: list[Obj] = [
    {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local", "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
        "provisioner": PROVISIONER, "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate", "allowVolumeExpansion": True,
    },
    {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local-wffc"},
        "provisioner": PROVISIONER, "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": True,
    },
]


REFLINK_STORAGE_CLASS: Obj = {
    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
    "metadata": {"name": REFLINK_CLASS},
    "provisioner": REFLINK_PROVISIONER, "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate", "allowVolumeExpansion": True,
}
REFLINK_SNAPSHOT_CLASS: Obj = {
    "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
    "metadata": {"name": REFLINK_CLASS,
                 "annotations": {"snapshot.storage.kubernetes.io/is-default-class": "true"}},
    "driver": REFLINK_PROVISIONER, "deletionPolicy": "Delete",
}


class Volumes:
    """Where local volumes live (reflink-class ones under their own root, linked in)."""

    def __init__(self, data_dir: Path, reflink_root: Path | None = None) -> None:
        # Absolute: reflink-class volumes are symlinks, resolved from the volume dir.
        self.root = data_dir.absolute() / "volumes"
        self.reflink_root = (reflink_root or data_dir / "reflink").absolute()

    def path(self, pv_name: str, *, block: bool) -> Path:
        return self.root / (f"{pv_name}.img" if block else pv_name)

    def snapshot_path(self, name: str, *, block: bool) -> Path:
        return self.reflink_root / "snapshots" / (f"{name}.img" if block else name)

    def create(self, pv_name: str, *, block: bool, size: int, reflinked: bool = False) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(pv_name, block=block)
        real = self._real(p, reflinked)
        if block:
            if not real.exists():
                with real.open("wb") as f:
                    f.truncate(size)
        else:
            real.mkdir(exist_ok=True)
        return p

    def _real(self, p: Path, reflinked: bool) -> Path:
        """Where the data of volume path ``p`` goes: for the reflink class, its root."""
        if not reflinked:
            return p
        real = self.reflink_root / "volumes" / p.name
        real.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_symlink():
            p.symlink_to(real)
        return real

    def clone(self, source: Path, pv_name: str, *, block: bool, size: int) -> Path:
        """A new reflink-class volume sharing the extents of ``source`` (a volume or snapshot)."""
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(pv_name, block=block)
        real = self._real(p, True)
        if block:
            reflink.clone_file(source.resolve(), real, size=size)
        else:
            reflink.remove(real)
            reflink.clone_tree(source.resolve(), real)
        return p

    def snapshot(self, pv_name: str, name: str, *, block: bool) -> Path:
        dst = self.snapshot_path(name, block=block)
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = self.path(pv_name, block=block).resolve()
        if block:
            reflink.clone_file(src, dst)
        else:
            reflink.remove(dst)
            reflink.clone_tree(src, dst)
        return dst

    def remove(self, pv_name: str) -> None:
        for block in (False, True):
            p = self.path(pv_name, block=block)
            if p.is_symlink():
                reflink.remove(p.resolve())
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def load_classes(data_dir: Path, volumes: Volumes | None = None) -> list[Obj]:
    """The storage classes of this data dir; the defaults are written on first start.

    ``local-reflink`` (and its VolumeSnapshotClass) is added when the reflink
    root of ``volumes`` can share extents; it is not written to the file, so a
    data dir moved to a filesystem without reflinks simply loses the class.
    """
    path = data_dir / "storage-classes.json"
    if not path.exists():
        path.write_text(json.dumps(DEFAULT_CLASSES, indent=2) + "\n")
    classes: list[Obj] = json.loads(path.read_text())
    if volumes is not None and reflink.supported(volumes.reflink_root) and \
            not any(c["metadata"]["name"] == REFLINK_CLASS for c in classes):
        classes += [REFLINK_STORAGE_CLASS, REFLINK_SNAPSHOT_CLASS]
    return classes


async def ensure_classes(store: ObjectStore, classes: list[Obj]) -> None:
    for sc in classes:
        try:
            await store.create(sc)
        except errors.AlreadyExists:
            pass


async def default_class(store: ObjectStore) -> Obj | None:
    for sc in (await store.list("StorageClass")).items:
        if sc.get("metadata", {}).get("annotations", {}).get(DEFAULT_CLASS_ANNOTATION) == "true":
            return sc
    return None


def requested_bytes(pvc: Obj) -> int:
    text = pvc.get("spec", {}).get("resources", {}).get("requests", {}).get("storage", "0")
    return units.parse_quantity(str(text))


async def watch_all(store: ObjectStore, kind: str,
                    handle: Callable[[str, Obj], Awaitable[None]]) -> None:
    """List KIND, then follow its watch; relist after 410 Gone or an error.  Every
    object is handed to HANDLE as ADDED first, then each event as it comes."""
    while True:
        try:
            listed = await store.list(kind)
            for obj in listed.items:
                await handle("ADDED", obj)
            async for ev in store.watch(kind, resource_version=listed.resource_version):
                await handle(ev.type, ev.object)
            return
        except asyncio.CancelledError:
            raise
        except errors.Gone:
            continue
        except Exception:
            log.exception("WATCH %s failed; relisting", kind)
            await asyncio.sleep(1)


class _NotYet(Exception):
    """A claim's dataSource cannot be used (yet: ``retry``; or at all)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


async def event(store: ObjectStore, obj: Obj, *, reason: str, message: str,
                type_: str = "Warning") -> None:
    """A core/v1 Event about ``obj`` from the provisioner."""
    meta = obj["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await store.create({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}",
                     "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj["kind"],
                           "name": meta["name"], "namespace": meta.get("namespace", ""),
                           "uid": meta.get("uid", "")},
        "reason": reason, "message": message, "type": type_, "count": 1,
        "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": "cdi-embedded-provisioner"}})


class Provisioner:
    def __init__(self, store: ObjectStore, volumes: Volumes) -> None:
        self._store = store
        self._volumes = volumes
        self._lock = asyncio.Lock()
        self._retry: set[tuple[str, str]] = set()

    async def run(self) -> None:
        retry = asyncio.create_task(self._retry_loop())
        try:
            await self._watch()
        finally:
            retry.cancel()

    async def _watch(self) -> None:
        await watch_all(self._store, "PersistentVolumeClaim", self._handle)

    async def _handle(self, event: str, pvc: Obj) -> None:
        async with self._lock:
            try:
                if event == "DELETED":
                    await self._release(pvc)
                else:
                    await self._bind(pvc)
            except errors.APIError as e:
                log.info("PROVISIONER %s: %s", pvc["metadata"]["name"], e)

    async def _class_of(self, pvc: Obj) -> Obj | None:
        name = pvc.get("spec", {}).get("storageClassName")
        if name is None:
            return await default_class(self._store)
        try:
            return await self._store.get("StorageClass", name)
        except errors.NotFound:
            return None

    async def _bind(self, pvc: Obj) -> None:
        meta: dict[str, Any] = pvc["metadata"]
        if pvc.get("status", {}).get("phase") == "Bound" or meta.get("deletionTimestamp"):
            return
        sc = await self._class_of(pvc)
        if sc is None or sc.get("provisioner") not in (PROVISIONER, REFLINK_PROVISIONER):
            return
        if (sc.get("volumeBindingMode") == "WaitForFirstConsumer"
                and SELECTED_NODE not in meta.get("annotations", {})):
            if pvc.get("status", {}).get("phase") != "Pending":
                await self._store.patch("PersistentVolumeClaim", meta["name"], meta["namespace"],
                                        {"status": {"phase": "Pending"}})
            return
        spec = pvc.get("spec", {})
        block = spec.get("volumeMode") == "Block"
        size = requested_bytes(pvc)
        pv_name = f"pvc-{meta['uid']}"
        reflinked = sc.get("provisioner") == REFLINK_PROVISIONER
        source = spec.get("dataSourceRef") or spec.get("dataSource")
        if source:
            try:
                origin = await self._data_source(pvc, sc, source)
            except _NotYet as e:
                await self._failed(pvc, str(e), retry=e.retry)
                return
            try:
                path = self._volumes.clone(origin, pv_name, block=block, size=size)
            except OSError as e:
                # ENOSPC, a source gone under us: this claim waits, the others go on.
                self._volumes.remove(pv_name)
                await self._failed(pvc, f"cannot copy the volume: {e.strerror or e}",
                                   retry=True)
                return
        else:
            try:
                path = self._volumes.create(pv_name, block=block, size=size,
                                            reflinked=reflinked)
            except OSError as e:
                await self._failed(pvc, f"cannot create the volume: {e.strerror or e}",
                                   retry=True)
                return
        self._retry.discard((meta["namespace"], meta["name"]))
        capacity = spec.get("resources", {}).get("requests", {}).get("storage", str(size))
        pv: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {"pv.kubernetes.io/provisioned-by":
                                                          sc["provisioner"]}},
            "spec": {
                "capacity": {"storage": capacity},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "volumeMode": "Block" if block else "Filesystem",
                "storageClassName": sc["metadata"]["name"],
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy", "Delete"),
                "claimRef": {"namespace": meta["namespace"], "name": meta["name"],
                             "uid": meta["uid"]},
                # A CSI volume for the reflink class (its driver decides clone strategies).
                **({"csi": {"driver": REFLINK_PROVISIONER, "volumeHandle": pv_name}}
                   if reflinked else {"local": {"path": str(path)}}),
            },
            "status": {"phase": "Bound"},
        }
        try:
            await self._store.create(pv)
        except errors.AlreadyExists:
            pass
        await self._store.patch("PersistentVolumeClaim", meta["name"], meta["namespace"], {
            "spec": {"volumeName": pv_name, "storageClassName": sc["metadata"]["name"]},
            "status": {"phase": "Bound", "accessModes": spec.get("accessModes", []),
                       "capacity": {"storage": capacity}},
        })
        log.info("BOUND %s/%s to %s (%s, %d bytes)", meta["namespace"], meta["name"], pv_name,
                 "block" if block else "filesystem", size)

    async def _data_source(self, pvc: Obj, sc: Obj, source: Obj) -> Path:
        """The volume or snapshot a claim with a dataSource is made from (CSI clone, restore)."""
        ns, spec = pvc["metadata"]["namespace"], pvc["spec"]
        mode = spec.get("volumeMode") or "Filesystem"
        kind, name = source.get("kind"), source.get("name", "")
        if sc.get("provisioner") != REFLINK_PROVISIONER:
            raise _NotYet(f"storage class {sc['metadata']['name']} cannot clone or restore "
                          f"volumes; use {REFLINK_CLASS}", retry=False)
        allow_expansion = bool(sc.get("allowVolumeExpansion"))
        if kind == "PersistentVolumeClaim" and not source.get("apiGroup"):
            try:
                src = await self._store.get("PersistentVolumeClaim", name, ns)
            except errors.NotFound:
                raise _NotYet(f'source claim "{name}" not found') from None
            if src.get("status", {}).get("phase") != "Bound":
                raise _NotYet(f'source claim "{name}" is not bound yet')
            pv = await self._store.get("PersistentVolume", src["spec"]["volumeName"])
            provisioner = pv["metadata"].get("annotations", {}).get(
                "pv.kubernetes.io/provisioned-by")
            if provisioner != REFLINK_PROVISIONER:
                raise _NotYet(f'source claim "{name}" is not of a {REFLINK_CLASS} class; '
                              "volumes are cloned only within a driver", retry=False)
            src_mode = src["spec"].get("volumeMode") or "Filesystem"
            capacity = units.parse_quantity(str(src["status"]["capacity"]["storage"]))
            path = self._volumes.path(src["spec"]["volumeName"], block=src_mode == "Block")
        elif kind == "VolumeSnapshot" and source.get("apiGroup") == "snapshot.storage.k8s.io":
            try:
                snap = await self._store.get("VolumeSnapshot", name, ns)
            except errors.NotFound:
                raise _NotYet(f'snapshot "{name}" not found') from None
            status = snap.get("status") or {}
            if not status.get("readyToUse"):
                raise _NotYet(f'snapshot "{name}" is not ready to use yet')
            content = await self._store.get("VolumeSnapshotContent",
                                            status["boundVolumeSnapshotContentName"])
            if content["spec"].get("driver") != REFLINK_PROVISIONER:
                raise _NotYet(f'snapshot "{name}" was taken by another driver', retry=False)
            src_mode = content["spec"].get("sourceVolumeMode") or "Filesystem"
            capacity = units.parse_quantity(str(status.get("restoreSize", "0")))
            path = self._volumes.snapshot_path(content["metadata"]["name"],
                                               block=src_mode == "Block")
        else:
            raise _NotYet(f"unsupported dataSource {source.get('apiGroup') or 'core'}/{kind}",
                          retry=False)
        if src_mode != mode:
            raise _NotYet(f"the source is a {src_mode} volume and the claim wants {mode}",
                          retry=False)
        request = requested_bytes(pvc)
        if request < capacity:
            raise _NotYet(f"requested volume size {request} is less than the size {capacity} "
                          "of the source", retry=False)
        if request > capacity and not allow_expansion:
            raise _NotYet(f"requested volume size {request} is larger than the source "
                          f"({capacity}) and storage class {sc['metadata']['name']} does not "
                          "allow volume expansion", retry=False)
        return path

    async def _failed(self, pvc: Obj, message: str, *, retry: bool) -> None:
        meta = pvc["metadata"]
        key = (meta["namespace"], meta["name"])
        if retry:
            self._retry.add(key)
        annotations = meta.get("annotations", {})
        if annotations.get(PROVISIONING_ERROR) != message:
            await self._store.patch("PersistentVolumeClaim", meta["name"], meta["namespace"], {
                "metadata": {"annotations": {PROVISIONING_ERROR: message}},
                "status": {"phase": "Pending"}})
            await event(self._store, pvc, reason="ProvisioningFailed",
                        message=f"failed to provision volume: {message}")
            log.info("PROVISIONING %s/%s failed: %s", *key, message)

    async def _retry_loop(self) -> None:
        """Claims waiting for a source that was not ready are looked at again each second."""
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            for ns, name in list(self._retry):
                try:
                    pvc = await self._store.get("PersistentVolumeClaim", name, ns)
                except errors.NotFound:
                    self._retry.discard((ns, name))
                    continue
                await self._handle("MODIFIED", pvc)

    async def _release(self, pvc: Obj) -> None:
        pv_name = pvc.get("spec", {}).get("volumeName")
        if not pv_name:
            return
        self._volumes.remove(pv_name)
        try:
            await self._store.delete("PersistentVolume", pv_name)
        except errors.NotFound:
            pass
        log.info("RELEASED %s", pv_name)
