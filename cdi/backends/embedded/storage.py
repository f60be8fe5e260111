"""The embedded provisioner: binds PersistentVolumeClaims to local volumes.

It plays the part a CSI provisioner plays on a cluster, and only that: for a
claim of a local storage class it makes a volume in the data dir (a directory
for ``Filesystem``, a sparse raw file of the exact size for ``Block``), creates
the PersistentVolume and binds the claim.  ``WaitForFirstConsumer`` classes
wait until a pod using the claim is scheduled (the pod runner sets
``volume.kubernetes.io/selected-node``).  Deleting a claim deletes its volume.
Storage classes come from ``storage-classes.json`` in the data dir, written
with the defaults on first start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from cdi.api import errors
from cdi.backends.port import Obj, ObjectStore
from importer import units

log = logging.getLogger(__name__)

PROVISIONER = "cdi.kubevirt.io/local"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
NODE_NAME = "localhost"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"

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


class Volumes:
    """Where local volumes live."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "volumes"

    def path(self, pv_name: str, *, block: bool) -> Path:
        return self.root / (f"{pv_name}.img" if block else pv_name)

    def create(self, pv_name: str, *, block: bool, size: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(pv_name, block=block)
        if block:
            if not p.exists():
                with p.open("wb") as f:
                    f.truncate(size)
        else:
            p.mkdir(exist_ok=True)
        return p

    def remove(self, pv_name: str) -> None:
        for block in (False, True):
            p = self.path(pv_name, block=block)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def load_classes(data_dir: Path) -> list[Obj]:
    """The storage classes of this data dir; the defaults are written on first start."""
    path = data_dir / "storage-classes.json"
    if not path.exists():
        path.write_text(json.dumps(DEFAULT_CLASSES, indent=2) + "\n")
    classes: list[Obj] = json.loads(path.read_text())
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


class Provisioner:
    def __init__(self, store: ObjectStore, volumes: Volumes) -> None:
        self._store = store
        self._volumes = volumes
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        while True:
            try:
                listed = await self._store.list("PersistentVolumeClaim")
                for pvc in listed.items:
                    await self._handle("ADDED", pvc)
                async for ev in self._store.watch("PersistentVolumeClaim",
                                                  resource_version=listed.resource_version):
                    await self._handle(ev.type, ev.object)
                return
            except asyncio.CancelledError:
                raise
            except errors.Gone:
                continue
            except Exception:
                log.exception("PROVISIONER watch failed; relisting")
                await asyncio.sleep(1)

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
        if sc is None or sc.get("provisioner") != PROVISIONER:
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
        path = self._volumes.create(pv_name, block=block, size=size)
        capacity = spec.get("resources", {}).get("requests", {}).get("storage", str(size))
        pv: Obj = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {"pv.kubernetes.io/provisioned-by":
                                                          PROVISIONER}},
            "spec": {
                "capacity": {"storage": capacity},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "volumeMode": "Block" if block else "Filesystem",
                "storageClassName": sc["metadata"]["name"],
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy", "Delete"),
                "claimRef": {"namespace": meta["namespace"], "name": meta["name"],
                             "uid": meta["uid"]},
                "local": {"path": str(path)},
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
