"""StorageProfile and CDIConfig controllers: keep their status in step with the classes.

A StorageProfile exists for every StorageClass (same name); its spec is the
user's, its status is what CDI's controllers use: claim property sets (access
modes and volume mode for a claim that does not say), clone strategy and
DataImportCron source format, each from the spec, else the class's
annotation, else what we know of the provisioner.  The CDIConfig singleton
``config`` carries the cluster-wide settings (scratch class, filesystem
overhead per class, worker resources, proxies, preallocation).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from cdi.api import errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.clone import snapshotclass
from cdi.controllers.runtime import Key, Mapper, Result

log = logging.getLogger(__name__)

LOCAL_PROVISIONER = "cdi.kubevirt.io/local"
REFLINK_PROVISIONER = "cdi.kubevirt.io/local-reflink"
_RWO_BOTH = [{"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"},
             {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block"}]
# What we know of provisioners: claim property sets and advised clone strategy.
CAPABILITIES: dict[str, tuple[list[dict[str, Any]], str]] = {
    LOCAL_PROVISIONER: (_RWO_BOTH, "copy"),
    # Reflink clones need no snapshot object: a CSI clone is the shortest way.
    REFLINK_PROVISIONER: (_RWO_BOTH, "csi-clone"),
}
STRATEGIES = ("copy", "snapshot", "csi-clone")
CLONE_STRATEGY_ANNOTATION = "cdi.kubevirt.io/clone-strategy"
DEFAULT_OVERHEAD = "0.06"
DEFAULT_RESOURCES = {"limits": {"cpu": "750m", "memory": "600M"},
                     "requests": {"cpu": "100m", "memory": "60M"}}


class StorageProfileController:
    name = "storageprofile"
    kind = "StorageProfile"

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._provisioners: dict[str, str] = {}  # storage class -> provisioner, as last seen

    def watches(self) -> dict[str, Mapper]:
        return {"StorageClass": lambda sc: [("", sc["metadata"]["name"])],
                "VolumeSnapshotClass": self._classes_of_driver}

    def _classes_of_driver(self, vsc: Obj) -> list[Key]:
        """A snapshot class changes the strategy and snapshot class of its driver's profiles."""
        return [("", name) for name, p in self._provisioners.items() if p == vsc.get("driver")]

    async def reconcile(self, key: Key) -> Result | None:
        name = key[1]
        try:
            sc = await self._store.get("StorageClass", name)
        except errors.NotFound:
            try:
                await self._store.delete("StorageProfile", name)
            except errors.NotFound:
                pass
            return None
        try:
            profile = await self._store.get("StorageProfile", name)
        except errors.NotFound:
            profile = await self._store.create({
                "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                "metadata": {"name": name}, "spec": {}})
        spec = profile.get("spec") or {}
        provisioner = sc.get("provisioner", "")
        self._provisioners[name] = provisioner
        known_sets, advised = CAPABILITIES.get(provisioner, ([], ""))
        snapshot_classes = (await self._store.list("VolumeSnapshotClass")).items
        try:
            chosen = snapshotclass.select(provisioner, spec.get("snapshotClass"),
                                          snapshot_classes)
        except snapshotclass.ClassNotFound:
            chosen = None
        annotated = sc.get("metadata", {}).get("annotations", {}).get(CLONE_STRATEGY_ANNOTATION)
        # CDI's order: the profile, the class's annotation (an unknown value counts as
        # unset), what is known of the provisioner, else snapshot if the driver has a
        # snapshot class, else copy.
        strategy = (spec.get("cloneStrategy")
                    or (annotated if annotated in STRATEGIES else "")
                    or advised or ("snapshot" if chosen else "copy"))
        status: dict[str, Any] = {
            "storageClass": name,
            "provisioner": provisioner,
            "claimPropertySets": spec.get("claimPropertySets") or known_sets,
            "cloneStrategy": strategy,
            "dataImportCronSourceFormat": spec.get("dataImportCronSourceFormat") or "pvc",
        }
        if chosen is not None:
            status["snapshotClass"] = chosen.name
        elif spec.get("snapshotClass"):
            status["snapshotClass"] = spec["snapshotClass"]
        recognized = provisioner in CAPABILITIES
        status["conditions"] = [{
            "type": "Recognized", "status": "True" if recognized else "False",
            "reason": "RecognizedProvisioner" if recognized else "UnrecognizedProvisioner",
            "message": "" if recognized else f"provisioner {provisioner} is not known to CDI",
        }]
        if profile.get("status") != status:
            updated = copy.deepcopy(profile)
            updated["status"] = status
            await self._store.replace_status(updated)
        return None


class CDIConfigController:
    name = "cdiconfig"
    kind = "CDIConfig"

    def __init__(self, store: ObjectStore, *, upload_proxy_url: str = "",
                 upload_proxy_ca: str = "") -> None:
        self._store = store
        self._upload_proxy_url = upload_proxy_url
        self._upload_proxy_ca = upload_proxy_ca

    def watches(self) -> dict[str, Mapper]:
        return {"StorageClass": lambda _sc: [("", "config")]}

    def set_upload_proxy_ca(self, ca: str) -> bool:
        """Publish CA (a rotated upload proxy CA bundle) from the next reconcile on;
        whether it changed (then the caller enqueues ``("", "config")``)."""
        changed = ca != self._upload_proxy_ca
        self._upload_proxy_ca = ca
        return changed

    async def ensure(self) -> None:
        try:
            await self._store.create({"apiVersion": "cdi.kubevirt.io/v1beta1",
                                      "kind": "CDIConfig", "metadata": {"name": "config"},
                                      "spec": {}})
        except errors.AlreadyExists:
            pass

    async def reconcile(self, key: Key) -> Result | None:
        if key[1] != "config":
            return None
        try:
            config = await self._store.get("CDIConfig", "config")
        except errors.NotFound:
            await self.ensure()
            return None
        spec = config.get("spec") or {}
        classes = [sc["metadata"]["name"] for sc in (await self._store.list("StorageClass")).items]
        overhead = spec.get("filesystemOverhead") or {}
        global_overhead = str(overhead.get("global") or DEFAULT_OVERHEAD)
        per_class = overhead.get("storageClass") or {}
        resources = copy.deepcopy(DEFAULT_RESOURCES)
        for section, values in (spec.get("podResourceRequirements") or {}).items():
            resources.setdefault(section, {}).update(values or {})
        scratch = spec.get("scratchSpaceStorageClass") or ""
        status: dict[str, Any] = {
            "scratchSpaceStorageClass": scratch if scratch in classes else "",
            "filesystemOverhead": {
                "global": global_overhead,
                "storageClass": {c: str(per_class.get(c, global_overhead)) for c in classes},
            },
            "defaultPodResourceRequirements": resources,
            "preallocation": bool(spec.get("preallocation", False)),
            "uploadProxyURL": spec.get("uploadProxyURLOverride") or self._upload_proxy_url,
        }
        if self._upload_proxy_ca:
            status["uploadProxyCA"] = self._upload_proxy_ca
        if spec.get("importProxy"):
            status["importProxy"] = spec["importProxy"]
        if config.get("status") != status:
            updated = copy.deepcopy(config)
            updated["status"] = status
            await self._store.replace_status(updated)
        return None
