"""DataImportCron end to end: a real `cdi serve` polling a real docker-registry.

One cron over one tag: the image at creation is imported and the DataSource
points at it; a new image pushed to the tag is imported on the next poll (forced
by setting ``storage.import.nextCronTime`` to the past) and the DataSource moves
only once that import Succeeded, with ``importsToKeep: 1`` collecting the older
volume; a broken image (no disk) leaves the DataSource where it was; and a
digest after the broken one replaces the failed import, and a fourth, good image
is imported and served in its turn.  A restart of `cdi serve`
neither polls again before the next run nor loses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from importer import containerdisk, qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support.registry import Registry

MiB = 1 << 20
NEXT = "cdi.kubevirt.io/storage.import.nextCronTime"
DIGEST = "cdi.kubevirt.io/storage.import.sourceDesiredDigest"


def _cron(url: str) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "golden-cron"},
            "spec": {"schedule": "* * * * *", "managedDataSource": "golden",
                     "importsToKeep": 1,
                     "template": {"spec": {
                         "source": {"registry": {"url": url}},
                         "storage": {"resources": {"requests": {"storage": "16Mi"}}}}}}}


def _poll_now(server: Server) -> None:
    r = server.session.patch(server.path("dic", "golden-cron"), timeout=10,
                             json={"metadata": {"annotations": {NEXT: "2000-01-01T00:00:00Z"}}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text


def _source(ds: dict[str, Any]) -> str:
    return str(((ds.get("spec") or {}).get("source") or {}).get("pvc", {}).get("name", ""))


def _gone(server: Server, kind: str, name: str) -> bool:
    return server.session.get(server.path(kind, name), timeout=10).status_code == 404


def test_a_cron_follows_its_tag(server: Server, registry: Registry, tmp_path: Path) -> None:
    r = server.session.patch(server.path("cdiconfig", "config", ""), timeout=10,
                             json={"spec": {"insecureRegistries": [registry.host]}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    ref = registry.ref("os/golden")
    first = images.make_raw(tmp_path / "first.raw", virtual_size=8 * MiB,
                            extents=[(0, MiB)], seed=1)
    second = images.make_raw(tmp_path / "second.raw", virtual_size=8 * MiB,
                             extents=[(MiB, MiB)], seed=2)
    d1 = containerdisk.publish(first, ref, insecure=True)
    name1 = "golden-" + d1.removeprefix("sha256:")[:12]

    # Created: polled at once, imported, and the DataSource points at the import.
    assert server.create(_cron(f"docker://{ref}")).status_code == 201
    ds = server.wait_for("das", "golden", lambda o: _source(o) == name1, timeout=60)
    assert ds["metadata"]["labels"]["cdi.kubevirt.io/dataImportCron"] == "golden-cron"
    assert ds["spec"]["source"]["pvc"] == {"namespace": "default", "name": name1}
    ds = server.wait_for("das", "golden", lambda o: condition(o, "Ready").get("status") == "True")
    assert ds["status"]["source"]["pvc"]["name"] == name1
    dv = server.get("dv", name1)
    assert phase(dv) == "Succeeded"
    host, _, _ = ref.rpartition(":")
    assert dv["spec"]["source"]["registry"]["url"] == f"docker://{host}@{d1}"
    assert dv["metadata"]["labels"]["cdi.kubevirt.io/dataImportCron"] == "golden-cron"
    assert dv["metadata"]["annotations"]["cdi.kubevirt.io/storage.bind.immediate.requested"] \
        == "true"
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "True")
    assert condition(cron, "UpToDate")["reason"] == "UpToDate"
    assert condition(cron, "UpToDate")["message"] == "Latest import is up to date"
    assert cron["metadata"]["annotations"][DIGEST] == d1
    assert cron["status"]["lastImportedPVC"] == {"namespace": "default", "name": name1}
    assert cron["status"]["sourceFormat"] == "pvc"
    assert cron["status"]["lastExecutionTimestamp"]
    assert qemu_img.compare(str(first), str(volume_of(server, name1)))

    # A new image on the tag: imported on the next poll, then the DataSource moves and the
    # older import is collected (importsToKeep: 1).
    d2 = containerdisk.publish(second, ref, insecure=True)
    name2 = "golden-" + d2.removeprefix("sha256:")[:12]
    _poll_now(server)
    server.wait_for("das", "golden", lambda o: _source(o) == name2, timeout=60)
    assert phase(server.get("dv", name2)) == "Succeeded"
    assert qemu_img.compare(str(second), str(volume_of(server, name2)))
    server.wait_for("dic", "golden-cron",
                    lambda o: condition(o, "UpToDate").get("status") == "True")
    cron = server.wait_for("dic", "golden-cron", lambda o: _gone(server, "dv", name1))
    assert cron["status"]["currentImports"] == [{"DataVolumeName": name2, "Digest": d2}]
    assert _gone(server, "pvc", name1)

    # A broken image (no disk in it): imported and retried, but the DataSource stays.
    work = tmp_path / "broken"
    layer = containerdisk.layer(work, containerdisk.files_entries({"README": b"no disk\n"}))
    pusher = containerdisk.Pusher(ref, insecure=True)
    try:
        d3 = pusher.push([containerdisk.image([layer])])
    finally:
        pusher.close()
    name3 = "golden-" + d3.removeprefix("sha256:")[:12]
    _poll_now(server)
    dv3 = server.wait_for("dv", name3,
                          lambda o: condition(o, "Running").get("reason") == "Error", timeout=60)
    assert "Failed to find VM disk image file" in condition(dv3, "Running")["message"]
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "False")
    assert condition(cron, "UpToDate")["reason"] in ("Outdated", "ImportProgressing")
    assert cron["status"]["currentImports"][0]["DataVolumeName"] == name3
    assert _source(server.get("das", "golden")) == name2

    # The tag moves on (back to the good image): the failed import is deleted and the
    # existing volume of that digest is used again.
    assert containerdisk.publish(second, ref, insecure=True) == d2
    _poll_now(server)
    server.wait_for("dic", "golden-cron", lambda o: _gone(server, "dv", name3), timeout=30)
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: condition(o, "UpToDate").get("status") == "True")
    assert cron["status"]["currentImports"] == [{"DataVolumeName": name2, "Digest": d2}]
    assert _source(server.get("das", "golden")) == name2

    # A new, good image (v4): imported, served, and the one before it collected.
    fourth = images.make_raw(tmp_path / "fourth.raw", virtual_size=8 * MiB,
                             extents=[(2 * MiB, MiB)], seed=4)
    d4 = containerdisk.publish(fourth, ref, insecure=True)
    name4 = "golden-" + d4.removeprefix("sha256:")[:12]
    _poll_now(server)
    server.wait_for("das", "golden", lambda o: _source(o) == name4, timeout=60)
    assert qemu_img.compare(str(fourth), str(volume_of(server, name4)))
    cron = server.wait_for("dic", "golden-cron",
                           lambda o: _gone(server, "pvc", name2) and
                           condition(o, "UpToDate").get("status") == "True")
    assert cron["status"]["currentImports"] == [{"DataVolumeName": name4, "Digest": d4}]


def test_a_restart_neither_skips_nor_repeats_a_run(server: Server, registry: Registry,
                                                   tmp_path: Path) -> None:
    r = server.session.patch(server.path("cdiconfig", "config", ""), timeout=10,
                             json={"spec": {"insecureRegistries": [registry.host]}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    ref = registry.ref("os/yearly")
    disk = images.make_raw(tmp_path / "disk.raw", virtual_size=4 * MiB, extents=[(0, MiB)])
    digest = containerdisk.publish(disk, ref, insecure=True)
    cron = _cron(f"docker://{ref}")
    cron["spec"]["schedule"] = "0 0 1 1 *"  # next run: next New Year
    assert server.create(cron).status_code == 201
    name = "golden-" + digest.removeprefix("sha256:")[:12]
    server.wait_for("das", "golden", lambda o: _source(o) == name, timeout=60)
    before = server.get("dic", "golden-cron")["metadata"]["annotations"]
    assert before[NEXT].endswith("-01-01T00:00:00Z")

    def polls() -> int:  # the cron's manifest HEADs (the importer GETs)
        return sum(1 for a in registry.accesses()
                   if a.method == "HEAD" and "/os/yearly/manifests/latest" in a.path)

    assert polls() == 1
    server.stop()
    server.start()
    # The DataSource controller and ours run again over everything...
    cron_after = server.wait_for("dic", "golden-cron",
                                 lambda o: condition(o, "UpToDate").get("status") == "True")
    server.wait_for("das", "golden", lambda o: condition(o, "Ready").get("status") == "True")
    # ...but the run is not due: no poll, the same next and last run.
    after = cron_after["metadata"]["annotations"]
    assert (after[NEXT], after["cdi.kubevirt.io/storage.import.lastCronTime"]) == \
        (before[NEXT], before["cdi.kubevirt.io/storage.import.lastCronTime"])
    assert polls() == 1
    # A forced run is polled exactly once, and the next run is the same New Year again.
    _poll_now(server)
    server.wait_for("dic", "golden-cron",
                    lambda o: o["metadata"]["annotations"][NEXT] == before[NEXT] and polls() == 2,
                    timeout=30)
    assert server.get("dic", "golden-cron")["status"]["currentImports"] == [
        {"DataVolumeName": name, "Digest": digest}]
    assert polls() == 2
