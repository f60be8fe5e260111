"""Where a DataImportCron keeps its imports: the snapshot source format, storage-class
changes and the default class, on the real SQLite store (the snapshotter played by the
test, as ``Env.finish`` plays the DataVolume controller)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdi.backends.port import Obj
from cdi.controllers import cronnames, cronsource
from tests.cdi.controllers.test_dataimportcron import D1, D2, NS, Env, at, cond, run

FIRST = "fedora-ds-111111111111"
SECOND = "fedora-ds-222222222222"


async def storage_class(env: Env, name: str, *, default: str | None = None,
                        provisioner: str = "example.com/csi") -> None:
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {default: "true"}
    await env.store.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                            "metadata": meta, "provisioner": provisioner})
    await env.store.create({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                            "metadata": {"name": name}, "spec": {},
                            "status": {"storageClass": name, "provisioner": provisioner,
                                       "dataImportCronSourceFormat": "pvc"}})


async def set_format(env: Env, name: str, fmt: str) -> None:
    profile = await env.store.get("StorageProfile", name)
    profile["status"]["dataImportCronSourceFormat"] = fmt
    await env.store.replace_status(profile)


async def snapshot_class(env: Env, name: str, driver: str = "example.com/csi") -> None:
    await env.store.create({"apiVersion": "snapshot.storage.k8s.io/v1",
                            "kind": "VolumeSnapshotClass", "metadata": {"name": name},
                            "driver": driver, "deletionPolicy": "Delete"})


async def make_ready(env: Env, name: str) -> None:
    snap = await env.get("VolumeSnapshot", name)
    snap["status"] = {"readyToUse": True, "restoreSize": "1Gi"}
    await env.store.replace_status(snap)


def source(ds: Obj) -> Obj:
    return dict(ds["spec"]["source"])


def test_snapshot_format_serves_snapshots_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await storage_class(env, "csi", default=cronsource.DEFAULT_CLASS)
        await snapshot_class(env, "csi-snap")
        await set_format(env, "csi", "snapshot")
        await env.cron(importsToKeep=1)
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cron["metadata"]["annotations"][cronsource.ANN_STORAGE_CLASS] == "csi"

        # The import succeeds: a snapshot of it is taken; not ready yet, so not served.
        env.now = at(10, 21)
        await env.finish(FIRST)
        await env.reconcile()
        snap = await env.get("VolumeSnapshot", FIRST)
        assert snap["spec"] == {"source": {"persistentVolumeClaimName": FIRST},
                                "volumeSnapshotClassName": "csi-snap"}
        assert snap["metadata"]["labels"]["cdi.kubevirt.io/dataImportCron"] == "fedora"
        assert snap["metadata"]["annotations"] == {
            cronnames.ANN_LAST_USE_TIME: "2026-03-01T10:21:00.000000Z",
            cronsource.ANN_ADVISED_RESTORE_SIZE: "1Gi"}
        await env.reconcile()  # as the snapshot's creation makes the runtime do
        cron = await env.get("DataImportCron", "fedora")
        assert cond(cron, "UpToDate") == ("False", "ImportProgressing",
                                          "Snapshot of imported data is progressing")
        assert cron["status"]["sourceFormat"] == "snapshot"
        assert source(await env.get("DataSource", "fedora-ds")) == {}

        # Ready: the DataSource serves the snapshot and the volume goes.
        await make_ready(env, FIRST)
        await env.reconcile()
        assert source(await env.get("DataSource", "fedora-ds")) == {
            "snapshot": {"namespace": NS, "name": FIRST}}
        assert not await env.exists("DataVolume", FIRST)
        cron = await env.get("DataImportCron", "fedora")
        assert cond(cron, "UpToDate") == ("True", "UpToDate", "Latest import is up to date")
        await env.reconcile()  # the volume is gone; the snapshot alone is the import
        cron = await env.get("DataImportCron", "fedora")
        assert cron["status"]["currentImports"] == [{"DataVolumeName": FIRST, "Digest": D1}]
        assert cond(cron, "UpToDate")[0] == "True"

        # A newer image: while its snapshot is not ready the old one is served and kept,
        # although importsToKeep is 1.
        env.digest, env.now = D2, at(11, 0)
        await env.reconcile()
        env.now = at(11, 5)
        await env.finish(SECOND)
        await env.reconcile()
        await env.reconcile()
        assert await env.exists("VolumeSnapshot", SECOND)
        assert source(await env.get("DataSource", "fedora-ds")) == {
            "snapshot": {"namespace": NS, "name": FIRST}}
        assert await env.exists("VolumeSnapshot", FIRST)
        await make_ready(env, SECOND)
        await env.reconcile()
        assert source(await env.get("DataSource", "fedora-ds")) == {
            "snapshot": {"namespace": NS, "name": SECOND}}
        assert not await env.exists("VolumeSnapshot", FIRST)
        assert not await env.exists("DataVolume", SECOND)
    run(test, tmp_path)


def test_switching_back_to_pvc_reimports(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await storage_class(env, "csi", default=cronsource.DEFAULT_CLASS)
        await set_format(env, "csi", "snapshot")
        await env.cron()
        await env.reconcile()
        await env.finish(FIRST)
        await env.reconcile()
        snap = await env.get("VolumeSnapshot", FIRST)
        assert "volumeSnapshotClassName" not in snap["spec"]  # no class of the driver
        await make_ready(env, FIRST)
        await env.reconcile()
        assert not await env.exists("DataVolume", FIRST)
        # Its claim goes with it (the owner-reference collector's part).
        await env.store.delete("PersistentVolumeClaim", FIRST, NS)

        await set_format(env, "csi", "pvc")
        assert await env.reconcile() == 1.0
        assert not await env.exists("VolumeSnapshot", FIRST)
        await env.reconcile()
        assert await env.exists("DataVolume", FIRST)  # imported again, as a volume
        await env.finish(FIRST)
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cron["status"]["sourceFormat"] == "pvc"
        assert source(await env.get("DataSource", "fedora-ds")) == {
            "pvc": {"namespace": NS, "name": FIRST}}
    run(test, tmp_path)


def test_a_new_storage_class_reimports_there(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await storage_class(env, "old", default=cronsource.DEFAULT_CLASS)
        await storage_class(env, "fast")
        await env.cron()
        await env.reconcile()
        await env.finish(FIRST)
        await env.reconcile()
        controller = env.controller
        fast = await env.store.get("StorageClass", "fast")
        assert controller._crons_of_class(fast) == [(NS, "fedora")]  # follows the default

        # The default virtualization class wins over the cluster default.
        fast["metadata"]["annotations"] = {cronsource.DEFAULT_VIRT_CLASS: "true"}
        await env.store.replace(fast)
        assert await env.reconcile() == 1.0
        assert not await env.exists("DataVolume", FIRST)
        assert not await env.exists("PersistentVolumeClaim", FIRST)
        cron = await env.get("DataImportCron", "fedora")
        assert cron["metadata"]["annotations"][cronsource.ANN_STORAGE_CLASS] == "fast"
        await env.reconcile()
        assert await env.exists("DataVolume", FIRST)
        await env.finish(FIRST)
        await env.reconcile()
        assert cond(await env.get("DataImportCron", "fedora"), "UpToDate")[0] == "True"

        # A class named in the template is kept whatever the defaults say.
        cron = await env.get("DataImportCron", "fedora")
        cron["spec"]["template"]["spec"]["storage"]["storageClassName"] = "old"
        await env.store.replace(cron)
        assert await env.reconcile() == 1.0
        await env.reconcile()
        dv = await env.get("DataVolume", FIRST)
        assert dv["spec"]["storage"]["storageClassName"] == "old"
        assert controller._crons_of_class(fast) == []
    run(test, tmp_path)


def test_a_pending_import_on_the_old_class_is_deleted(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await storage_class(env, "old", default=cronsource.DEFAULT_CLASS)
        await storage_class(env, "new")
        await env.cron()
        await env.reconcile()
        await env.store.create({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": FIRST, "namespace": NS,
                         "labels": {"cdi.kubevirt.io/dataImportCron": "fedora"}},
            "spec": {"storageClassName": "old",
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"}})
        cron = await env.get("DataImportCron", "fedora")
        cron["spec"]["template"]["spec"]["storage"]["storageClassName"] = "new"
        await env.store.replace(cron)
        assert await env.reconcile() is None
        assert not await env.exists("PersistentVolumeClaim", FIRST)
    run(test, tmp_path)
