"""Where a DataImportCron keeps its imports: the storage class, PVC or snapshot format.

The cron controller (``dataimportcron.py``) decides *when* to import; this
module answers the storage questions CDI's controller asks on every
reconcile, as functions over the object store:

- **Which storage class.**  The template's ``storage``/``pvc``
  ``storageClassName``; without one, the default virtualization class
  (``storageclass.kubevirt.io/is-default-virt-class``, for kubevirt content),
  else the cluster default (``storageclass.kubernetes.io/is-default-class``);
  among several defaults the newest, then the first by name, as Kubernetes
  picks.  The choice is remembered on the cron in
  ``storage.import.storageClass``; when it changes, the newest import on the
  old class is deleted and imported again on the new one.
- **Which format.**  ``status.dataImportCronSourceFormat`` of that class's
  StorageProfile: ``pvc`` (the default) or ``snapshot``.
- **Snapshot format.**  Once an import succeeded, a VolumeSnapshot of the
  same name is taken of its claim (class: the profile's
  ``cdi.kubevirt.io/snapshotClassForDataImportCron`` annotation, else the
  smart-clone choice of ``clone.snapshotclass``), labelled for the cron and
  annotated with the source's volume mode and advised restore size.  When it
  is ready to use, the DataVolume and claim are deleted: the snapshot is the
  golden image, and the DataSource points at it.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable
from typing import Any

from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import events
from cdi.controllers.clone import snapshotclass
from cdi.controllers.cronnames import ANN_LAST_USE_TIME, dv_name, garbage, rfc3339nano

log = logging.getLogger(__name__)

A = "cdi.kubevirt.io/"
ANN_STORAGE_CLASS = A + "storage.import.storageClass"
ANN_SOURCE_VOLUME_MODE = A + "storage.import.sourceVolumeMode"
ANN_ADVISED_RESTORE_SIZE = A + "storage.import.advisedRestoreSize"
ANN_SNAPSHOT_CLASS_FOR_CRON = A + "snapshotClassForDataImportCron"
DEFAULT_VIRT_CLASS = "storageclass.kubevirt.io/is-default-virt-class"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"

PVC = "pvc"
SNAPSHOT = "snapshot"
MSG_SNAPSHOT_PROGRESSING = "Snapshot of imported data is progressing"


def template_spec(cron: Obj) -> Obj:
    return (((cron.get("spec") or {}).get("template") or {}).get("spec") or {})


def _target(spec: Obj) -> Obj:
    """The template's ``storage`` (or legacy ``pvc``) section."""
    return spec.get("storage") or spec.get("pvc") or {}


def explicit_class(cron: Obj) -> str:
    return str(_target(template_spec(cron)).get("storageClassName") or "")


def _newest_default(classes: list[Obj], annotation: str) -> Obj | None:
    marked = [c for c in classes
              if ((c.get("metadata") or {}).get("annotations") or {}).get(annotation) == "true"]
    if not marked:
        return None
    by_name = sorted(marked, key=lambda c: str(c["metadata"].get("name", "")))
    # Newest first; equal times keep the name order (the sort is stable).
    return sorted(by_name, key=lambda c: str(c["metadata"].get("creationTimestamp", "")),
                  reverse=True)[0]


async def desired_class(store: ObjectStore, cron: Obj) -> Obj | None:
    """The StorageClass the cron's imports go to, or None if there is none."""
    name = explicit_class(cron)
    if name:
        try:
            return await store.get("StorageClass", name)
        except api_errors.NotFound:
            return None
    classes = (await store.list("StorageClass")).items
    if template_spec(cron).get("contentType", "kubevirt") in ("", "kubevirt"):
        virt = _newest_default(classes, DEFAULT_VIRT_CLASS)
        if virt is not None:
            return virt
    return _newest_default(classes, DEFAULT_CLASS)


async def _profile(store: ObjectStore, class_name: str) -> Obj | None:
    try:
        return await store.get("StorageProfile", class_name)
    except api_errors.NotFound:
        return None


async def source_format(store: ObjectStore, storage_class: Obj | None) -> str:
    """``pvc`` or ``snapshot``, from the class's StorageProfile status."""
    if storage_class is None:
        return PVC
    profile = await _profile(store, storage_class["metadata"]["name"])
    fmt = ((profile or {}).get("status") or {}).get("dataImportCronSourceFormat")
    return SNAPSHOT if fmt == SNAPSHOT else PVC


async def get(store: ObjectStore, kind: str, name: str, ns: str) -> Any:
    if not name:
        return None
    try:
        return await store.get(kind, name, ns)
    except api_errors.NotFound:
        return None


async def snapshot_class_for(store: ObjectStore, claim: Obj | None, class_name: str,
                             cron: Obj) -> str:
    """The VolumeSnapshotClass for the cron's snapshots ("" when none fits)."""
    profile = await _profile(store, class_name)
    named = ((profile or {}).get("metadata", {}).get("annotations") or {}).get(
        ANN_SNAPSHOT_CLASS_FOR_CRON)
    if named:
        return str(named)
    storage_class = await get(store, "StorageClass", class_name, "")
    volume = None
    if claim is not None and claim["spec"].get("volumeName"):
        volume = await get(store, "PersistentVolume", claim["spec"]["volumeName"], "")
    try:
        driver = snapshotclass.claim_driver(claim or {"spec": {}}, volume, storage_class)
    except snapshotclass.ClaimRefMismatch:
        driver = None
    if driver is None:
        return ""
    classes = (await store.list("VolumeSnapshotClass")).items
    try:
        chosen = snapshotclass.select(driver, snapshotclass.profile_class(profile), classes)
    except snapshotclass.ClassNotFound as e:
        log.warning("dataimportcron %s: %s", cron["metadata"]["name"], e)
        return ""
    if chosen is None:
        return ""
    if claim is not None:
        await events.emit(store, claim, reason=snapshotclass.VOLUME_SNAPSHOT_CLASS_SELECTED,
                          message=chosen.message)
    return chosen.name


def ready(snapshot: Obj | None) -> bool:
    return bool(snapshot is not None and (snapshot.get("status") or {}).get("readyToUse"))


async def delete_volume(store: ObjectStore, name: str, ns: str) -> None:
    """The DataVolume (its claim goes with it), else the claim."""
    for kind in ("DataVolume", "PersistentVolumeClaim"):
        try:
            await store.delete(kind, name, ns)
            return
        except api_errors.NotFound:
            continue


async def snapshot_import(store: ObjectStore, cron: Obj, claim: Obj | None, class_name: str,
                          labels: dict[str, str], now: datetime.datetime) -> None:
    """Snapshot a succeeded import; once the snapshot is ready, drop its volume."""
    if claim is None:
        return
    if claim["spec"].get("storageClassName", class_name) != class_name:
        return  # the class is changing: no snapshot of the old class's claim
    meta = claim["metadata"]
    name, ns = meta["name"], meta["namespace"]
    current = await get(store, "VolumeSnapshot", name, ns)
    if current is not None:
        if ready(current):
            log.info("[%s/%s] dataimportcron: snapshot %s is ready; deleting its volume", ns,
                     cron["metadata"]["name"], name)
            await delete_volume(store, name, ns)
        return
    annotations = {ANN_LAST_USE_TIME: rfc3339nano(now)}
    size = str((((_target(template_spec(cron)).get("resources") or {}).get("requests") or {})
                .get("storage")) or "")
    size = size or str(((claim["spec"].get("resources") or {}).get("requests") or {})
                       .get("storage") or "")
    if size:
        annotations[ANN_ADVISED_RESTORE_SIZE] = size
    if claim["spec"].get("volumeMode"):
        annotations[ANN_SOURCE_VOLUME_MODE] = str(claim["spec"]["volumeMode"])
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": name}}
    vsc = await snapshot_class_for(store, claim, class_name, cron)
    if vsc:
        spec["volumeSnapshotClassName"] = vsc
    snapshot = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels),
                             "annotations": annotations},
                "spec": spec}
    try:
        await store.create(snapshot)
        log.info("[%s/%s] dataimportcron: snapshot %s of the import (class %s)", ns,
                 cron["metadata"]["name"], name, vsc or "none")
    except api_errors.AlreadyExists:
        pass


async def snapshot_class_changed(store: ObjectStore, snapshot: Obj, class_name: str,
                                 cron: Obj) -> bool:
    """Delete ``snapshot`` if the profile now asks for another snapshot class."""
    desired = await snapshot_class_for(store, None, class_name, cron)
    actual = str((snapshot.get("spec") or {}).get("volumeSnapshotClassName") or "")
    if not desired or desired == actual:
        return False
    meta = snapshot["metadata"]
    log.info("[%s/%s] dataimportcron: snapshot class of %s changed from %s to %s; deleting it",
             meta["namespace"], cron["metadata"]["name"], meta["name"], actual, desired)
    try:
        await store.delete("VolumeSnapshot", meta["name"], meta["namespace"])
    except api_errors.NotFound:
        pass
    return True


async def remove_sources(store: ObjectStore, name: str, ns: str) -> bool:
    """Delete the snapshot, DataVolume and claim ``name``; True once all are gone."""
    kinds = ("VolumeSnapshot", "DataVolume", "PersistentVolumeClaim")
    for kind in kinds:
        try:
            await store.delete(kind, name, ns)
        except api_errors.NotFound:
            pass
    for kind in kinds:
        if await get(store, kind, name, ns) is not None:
            return False
    return True


async def delete_outdated_pending(store: ObjectStore, pvc: Obj | None, class_name: str,
                                  cron_name: str, cron_label: str) -> bool:
    """A still-Pending import claim of the cron on another class than CLASS_NAME goes."""
    if pvc is None or (pvc.get("status") or {}).get("phase") != "Pending":
        return False
    if (pvc["metadata"].get("labels") or {}).get(cron_label) != cron_name:
        return False
    current = pvc["spec"].get("storageClassName")
    if not current or current == class_name:
        return False
    meta = pvc["metadata"]
    log.info("[%s/%s] dataimportcron: deleting pending claim %s of class %s",
             meta["namespace"], cron_name, meta["name"], current)
    try:
        await store.delete("PersistentVolumeClaim", meta["name"], meta["namespace"])
    except api_errors.NotFound:
        pass
    return True


async def change_class(store: ObjectStore, cron: Obj, old: str, new: str,
                       digest_annotation: str) -> None:
    """The storage class changed: delete the newest import (it lives on the old class),
    and record the new class once it is gone, so the next pass imports it again."""
    meta = cron["metadata"]
    digest = (meta.get("annotations") or {}).get(digest_annotation, "")
    if digest:
        try:
            name = dv_name(cron["spec"]["managedDataSource"], digest)
        except ValueError:
            name = ""
        log.info("[%s/%s] dataimportcron: storage class %s -> %s; deleting import %s",
                 meta["namespace"], meta["name"], old, new, name)
        if name and not await remove_sources(store, name, meta["namespace"]):
            return  # still going away: try again
    await store.patch("DataImportCron", meta["name"], meta["namespace"],
                      {"metadata": {"annotations": {ANN_STORAGE_CLASS: new}}})


DEFAULT_IMPORTS_TO_KEEP = 3


async def collect_garbage(store: ObjectStore, cron: Obj, cron_label: str) -> None:
    """Keep the cron's ``importsToKeep`` newest imports (claims, snapshots) by last use.

    What the DataSource serves now is never collected, however old: with the
    snapshot format it stays there until the newer snapshot is ready.
    """
    spec = cron["spec"]
    if spec.get("garbageCollect") not in (None, "", "Outdated"):
        return
    keep = spec.get("importsToKeep")
    keep = keep if isinstance(keep, int) and keep >= 0 else DEFAULT_IMPORTS_TO_KEEP
    ns, name = cron["metadata"]["namespace"], cron["metadata"]["name"]
    selector = f"{cron_label}={name}"
    ds = await get(store, "DataSource", spec.get("managedDataSource") or "", ns)
    in_use = {str(s.get("name")) for s in ((ds or {}).get("spec", {}).get("source") or {})
              .values() if isinstance(s, dict) and s.get("namespace", ns) == ns}
    pvcs = (await store.list("PersistentVolumeClaim", ns, label_selector=selector)).items
    dvs = (await store.list("DataVolume", ns, label_selector=selector)).items
    for victim in garbage([*pvcs, *dvs], keep):
        if victim not in in_use:
            log.info("[%s/%s] dataimportcron: deleting old import %s", ns, name, victim)
            await delete_volume(store, victim, ns)
    snapshots = (await store.list("VolumeSnapshot", ns, label_selector=selector)).items
    for victim in garbage(snapshots, keep):
        if victim not in in_use:
            log.info("[%s/%s] dataimportcron: deleting old snapshot %s", ns, name, victim)
            try:
                await store.delete("VolumeSnapshot", victim, ns)
            except api_errors.NotFound:
                pass


async def update_data_source(store: ObjectStore, cron: Obj, last_imported: Any, fmt: str,
                             labels: Callable[[Obj, dict[str, str] | None], dict[str, str]],
                             cron_label: str) -> None:
    """Create the managed DataSource, or point ours at LAST_IMPORTED as FMT (pvc/snapshot).

    A DataSource of that name labelled for no cron or another one is left alone
    (CDI's ErrNotManagedByCron).
    """
    ns, name = cron["metadata"]["namespace"], cron["metadata"]["name"]
    ds_name = cron["spec"].get("managedDataSource") or ""
    if not ds_name:
        return
    source = {fmt: dict(last_imported)} if isinstance(last_imported, dict) else None
    ds = await get(store, "DataSource", ds_name, ns)
    if ds is None:
        try:
            await store.create({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
                                "metadata": {"name": ds_name, "namespace": ns,
                                             "labels": labels(cron, None)},
                                "spec": {"source": source or {}}})
            log.info("[%s/%s] dataimportcron: created DataSource %s", ns, name, ds_name)
        except api_errors.AlreadyExists:
            pass
        return
    if (ds["metadata"].get("labels") or {}).get(cron_label) != name:
        return
    updated = copy.deepcopy(ds)
    updated["metadata"]["labels"] = labels(cron, ds["metadata"].get("labels"))
    if source is not None:
        updated.setdefault("spec", {})["source"] = source
    if updated != ds:
        await store.replace(updated)
        log.info("[%s/%s] dataimportcron: DataSource %s -> %s", ns, name, ds_name,
                 last_imported.get("name") if isinstance(last_imported, dict) else None)
