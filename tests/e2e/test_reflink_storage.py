"""The local-reflink class of `cdi serve` on a real XFS (reflink) loop mount:
VolumeSnapshots, restores and CSI-style clones are reflink copies, and what
cannot be done is refused with a reason."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_datavolume import volume_of
from tests.support import xfs

MiB = 1 << 20
SNAP = "snapshot.storage.k8s.io"


def _claim(name: str, size: str, *, mode: str = "Filesystem", cls: str = "local-reflink",
           source: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                            "storageClassName": cls,
                            "resources": {"requests": {"storage": size}}}
    if source:
        spec["dataSource"] = source
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": spec}


def _bound(server: Server, name: str) -> dict[str, Any]:
    return server.wait_for("pvc", name, lambda o: o.get("status", {}).get("phase") == "Bound")


def _fill(path: Path, size: int, seed: bytes) -> str:
    """Write ``size`` bytes of data; return their sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        block = hashlib.sha256(seed).digest() * (MiB // 32)
        for _ in range(size // MiB):
            f.write(block)
            h.update(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _sha(path: Path, length: int) -> str:
    """sha256 of the first ``length`` bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while length > 0 and (chunk := f.read(min(MiB, length))):
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def _events(server: Server, name: str) -> list[tuple[str, str]]:
    items = server.session.get(server.url + "/api/v1/namespaces/default/events",
                               timeout=10).json()["items"]
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == name]


@pytest.mark.parametrize("mode", ["Filesystem", "Block"])
def test_snapshot_restore_and_clone_share_extents(reflink_server: Server, mode: str) -> None:
    server = reflink_server
    classes = {c["metadata"]["name"]: c for c in server.session.get(
        server.path("storageclass", None, ""), timeout=10).json()["items"]}
    assert classes["local-reflink"]["provisioner"] == "cdi.kubevirt.io/local-reflink"
    vsc = server.get("volumesnapshotclass", "local-reflink", namespace="")
    assert vsc["driver"] == "cdi.kubevirt.io/local-reflink"
    profile = server.wait_for("storageprofile", "local-reflink",
                              lambda o: "snapshotClass" in o.get("status", {}), namespace="")
    assert (profile["status"]["cloneStrategy"], profile["status"]["snapshotClass"]) == (
        "csi-clone", "local-reflink")
    plain = server.get("storageprofile", "local", namespace="")["status"]
    assert (plain["cloneStrategy"], "snapshotClass" in plain) == ("copy", False)

    assert server.create(_claim("src", "256Mi", mode=mode)).status_code == 201
    pvc = _bound(server, "src")
    pv = server.get("persistentvolume", pvc["spec"]["volumeName"], namespace="")
    assert pv["spec"]["csi"]["driver"] == "cdi.kubevirt.io/local-reflink"
    disk = volume_of(server, "src")
    digest = _fill(disk, 192 * MiB, b"first")
    root = Path(server.args[1])
    before = xfs.free_bytes(root)

    snap = {"apiVersion": f"{SNAP}/v1", "kind": "VolumeSnapshot", "metadata": {"name": "s1"},
            "spec": {"source": {"persistentVolumeClaimName": "src"}}}
    assert server.create(snap).status_code == 201
    taken = server.wait_for("volumesnapshot", "s1",
                            lambda o: (o.get("status") or {}).get("readyToUse") is True)
    assert taken["status"]["restoreSize"] == "256Mi"
    content = server.get("volumesnapshotcontent",
                         taken["status"]["boundVolumeSnapshotContentName"], namespace="")
    assert (content["spec"]["driver"], content["spec"]["sourceVolumeMode"]) == (
        "cdi.kubevirt.io/local-reflink", mode)

    restore_src = {"apiGroup": SNAP, "kind": "VolumeSnapshot", "name": "s1"}
    assert server.create(_claim("restored", "256Mi", mode=mode,
                                source=restore_src)).status_code == 201
    assert server.create(_claim("cloned", "512Mi", mode=mode, source={
        "kind": "PersistentVolumeClaim", "name": "src"})).status_code == 201
    _bound(server, "restored")
    _bound(server, "cloned")
    # A snapshot, a restore and a clone of 192 MiB of data took almost no space.
    assert before - xfs.free_bytes(root) < 16 * MiB
    _fill(disk, 192 * MiB, b"second")  # the source changes after the copies
    assert _sha(volume_of(server, "restored"), 192 * MiB) == digest
    cloned = volume_of(server, "cloned")
    assert _sha(cloned, 192 * MiB) == digest
    assert _sha(disk, 192 * MiB) != digest
    if mode == "Block":
        assert cloned.stat().st_size == 512 * MiB  # grown to the claim (expansion allowed)

    # Deleting the snapshot deletes its content and its data.
    r = server.session.delete(server.path("volumesnapshot", "s1"), timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    name = content["metadata"]["name"]
    while server.session.get(server.path("volumesnapshotcontent", name, ""),
                             timeout=10).status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not list((root / "snapshots").iterdir())


def test_what_cannot_be_cloned_is_refused_with_a_reason(reflink_server: Server) -> None:
    server = reflink_server
    assert server.create(_claim("big", "256Mi")).status_code == 201
    assert server.create(_claim("plain", "64Mi", cls="local")).status_code == 201
    _bound(server, "big")
    _bound(server, "plain")
    cases = {
        "smaller": (_claim("smaller", "64Mi", source={"kind": "PersistentVolumeClaim",
                                                       "name": "big"}),
                    "failed to provision volume: requested volume size 67108864 is less than "
                    "the size 268435456 of the source"),
        "othermode": (_claim("othermode", "256Mi", mode="Block",
                             source={"kind": "PersistentVolumeClaim", "name": "big"}),
                      "failed to provision volume: the source is a Filesystem volume and the "
                      "claim wants Block"),
        "fromplain": (_claim("fromplain", "64Mi", source={"kind": "PersistentVolumeClaim",
                                                           "name": "plain"}),
                      'failed to provision volume: source claim "plain" is not of a '
                      "local-reflink class; volumes are cloned only within a driver"),
        "plainclass": (_claim("plainclass", "256Mi", cls="local",
                              source={"kind": "PersistentVolumeClaim", "name": "big"}),
                       "failed to provision volume: storage class local cannot clone or "
                       "restore volumes; use local-reflink"),
    }
    for obj, _message in cases.values():
        assert server.create(obj).status_code == 201
    for name, (_obj, message) in cases.items():
        deadline = time.monotonic() + 20
        while ("ProvisioningFailed", message) not in _events(server, name):
            assert time.monotonic() < deadline, (name, _events(server, name))
            time.sleep(0.1)
        assert server.get("pvc", name)["status"]["phase"] == "Pending"
    # A clone of a claim that does not exist yet waits, then binds when it appears.
    assert server.create(_claim("early", "64Mi", source={"kind": "PersistentVolumeClaim",
                                                         "name": "late"})).status_code == 201
    deadline = time.monotonic() + 20
    while ("ProvisioningFailed", 'failed to provision volume: source claim "late" not found') \
            not in _events(server, "early"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.create(_claim("late", "64Mi")).status_code == 201
    _bound(server, "early")


def test_no_reflink_class_where_extents_cannot_be_shared(tmp_path: Path) -> None:
    with xfs.tmpfs(tmp_path) as mnt:
        server = Server(tmp_path / "serve", "--reflink-root", str(mnt)).start()
        try:
            names = {c["metadata"]["name"] for c in server.session.get(
                server.path("storageclass", None, ""), timeout=10).json()["items"]}
            assert names == {"local", "local-wffc"}
            snap_classes = server.session.get(server.path("volumesnapshotclass", None, ""),
                                              timeout=10).json()["items"]
            assert snap_classes == []
        finally:
            server.session.close()
            server.stop()


def test_snapshot_of_a_claim_that_comes_later(reflink_server: Server) -> None:
    server = reflink_server
    snap = {"apiVersion": f"{SNAP}/v1", "kind": "VolumeSnapshot", "metadata": {"name": "early"},
            "spec": {"source": {"persistentVolumeClaimName": "later"}}}
    assert server.create(snap).status_code == 201
    waiting = server.wait_for("volumesnapshot", "early",
                              lambda o: bool((o.get("status") or {}).get("error") or {}))
    assert waiting["status"]["error"]["message"] == (
        'failed to get input parameters to create snapshot early: '
        'persistentvolumeclaim "later" not found')
    assert server.create(_claim("later", "64Mi")).status_code == 201
    ready = server.wait_for("volumesnapshot", "early",
                            lambda o: (o.get("status") or {}).get("readyToUse") is True)
    assert "error" not in ready["status"] or not ready["status"]["error"]
