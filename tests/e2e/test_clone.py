"""DataVolume clones end to end through `cdi serve`: every strategy, its phase,
annotations and events, and content equal to the source."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images

MiB = 1 << 20
A = "cdi.kubevirt.io/"


def _source(server: Server, tmp_path: Path, name: str, *, cls: str, mode: str = "Filesystem",
            namespace: str = "default") -> Path:
    """An uploaded source volume (a sparse raw with a few extents); returns the raw file."""
    raw = images.make_raw(tmp_path / f"{name}.raw", virtual_size=64 * MiB,
                          extents=[(0, MiB), (40 * MiB, 3 * MiB)], seed=len(name))
    p = server.cli("image-upload", "dv", name, "-n", namespace, "--image-path", str(raw),
                   "--size", "64Mi", "--storage-class", cls, "--volume-mode", mode.lower())
    assert p.returncode == 0, p.stderr
    return raw


def _clone(name: str, source: str, *, cls: str, size: str | None = "64Mi",
           mode: str | None = None, namespace: str = "default",
           source_namespace: str | None = None) -> dict[str, Any]:
    storage: dict[str, Any] = {"storageClassName": cls}
    if size:
        storage["resources"] = {"requests": {"storage": size}}
    if mode:
        storage["volumeMode"] = mode
    src: dict[str, Any] = {"name": source}
    if source_namespace:
        src["namespace"] = source_namespace
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"pvc": src}, "storage": storage}}


def _events(server: Server, name: str, namespace: str = "default") -> list[tuple[str, str]]:
    items = server.session.get(server.url + f"/api/v1/namespaces/{namespace}/events",
                               timeout=10).json()["items"]
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == name]


def _phases(server: Server, name: str, timeout: float = 90,
            namespace: str = "default") -> list[str]:
    """The phases the DataVolume goes through until it Succeeds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = server.session.get(server.path("dv", name, namespace), timeout=10)
        if r.status_code == 200:
            ph = phase(r.json())
            if ph and (not seen or seen[-1] != ph):
                seen.append(ph)
            if ph in ("Succeeded", "Failed"):
                return seen
        time.sleep(0.05)
    raise AssertionError(f"{name} did not finish; phases {seen}\n{server.log()}")


@pytest.mark.parametrize(("strategy", "middle"), [
    ("csi-clone", "CSICloneInProgress"),
    ("snapshot", "SnapshotForSmartCloneInProgress"),
])
def test_reflink_clones(reflink_server: Server, tmp_path: Path, strategy: str,
                        middle: str) -> None:
    server = reflink_server
    raw = _source(server, tmp_path, "golden", cls="local-reflink")
    r = server.session.patch(server.path("storageprofile", "local-reflink", ""), timeout=10,
                             json={"spec": {"cloneStrategy": strategy}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    server.wait_for("storageprofile", "local-reflink",
                    lambda o: o["status"]["cloneStrategy"] == strategy, namespace="")
    assert server.create(_clone("copy1", "golden", cls="local-reflink")).status_code == 201
    seen = _phases(server, "copy1")
    assert seen[-1] == "Succeeded", seen
    # Phases can pass faster than a poll: the events record each one.
    assert middle in [r for r, _ in _events(server, "copy1")]
    pvc = server.get("pvc", "copy1")
    assert pvc["metadata"]["annotations"][A + "cloneType"] == strategy
    assert A + "cloneFallbackReason" not in pvc["metadata"]["annotations"]
    assert qemu_img.compare(str(raw), str(volume_of(server, "copy1")))
    dv = server.get("dv", "copy1")
    assert (condition(dv, "Running")["reason"], condition(dv, "Running")["message"]) == (
        "Completed", "Clone Complete")
    assert ("CloneSucceeded", "Successfully cloned from default/golden into default/copy1") \
        in _events(server, "copy1")
    if strategy == "snapshot":
        assert ("VolumeSnapshotClassSelected",
                "VolumeSnapshotClass selected according to StorageProfile local-reflink") in \
            _events(server, "copy1")
        snaps = server.session.get(server.path("volumesnapshot", None), timeout=10).json()
        assert snaps["items"] == [], "the temporary snapshot is removed"


def test_snapshot_strategy_on_a_class_without_snapshots_falls_back(server: Server,
                                                                   tmp_path: Path) -> None:
    raw = _source(server, tmp_path, "plain", cls="local")
    r = server.session.patch(server.path("storageprofile", "local", ""), timeout=10,
                             json={"spec": {"cloneStrategy": "snapshot"}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    server.wait_for("storageprofile", "local",
                    lambda o: o["status"]["cloneStrategy"] == "snapshot", namespace="")
    assert server.create(_clone("fell", "plain", cls="local")).status_code == 201
    seen = _phases(server, "fell")
    assert seen[-1] == "Succeeded", seen
    assert "CloneScheduled" in [r for r, _ in _events(server, "fell")]
    ann = server.get("pvc", "fell")["metadata"]["annotations"]
    assert (ann[A + "cloneType"], ann[A + "cloneFallbackReason"]) == (
        "copy", "No compatible volumesnapshotclass found")
    assert ("NoVolumeSnapshotClass", "No compatible volumesnapshotclass found") in \
        _events(server, "fell")
    assert qemu_img.compare(str(raw), str(volume_of(server, "fell")))


def test_target_smaller_than_source_is_refused(server: Server, tmp_path: Path) -> None:
    _source(server, tmp_path, "big", cls="local")
    assert server.create(_clone("small", "big", cls="local", size="16Mi")).status_code == 201
    dv = server.wait_for("dv", "small",
                         lambda o: condition(o, "Running").get("reason") == "ErrIncompatiblePVC")
    assert phase(dv) == "Pending"
    message = condition(dv, "Running")["message"]
    assert message.startswith("target resources requests storage size is smaller than the "
                              "source "), message
    reasons = [r for r, _ in _events(server, "small")]
    assert "ErrIncompatiblePVC" in reasons and "CloneValidationFailed" in reasons
    missing = _clone("orphan", "nothere", cls="local")
    assert server.create(missing).status_code == 201
    dv = server.wait_for("dv", "orphan",
                         lambda o: condition(o, "Running").get("reason") == "CloneWithoutSource")
    assert condition(dv, "Running")["message"] == "The source pvc nothere doesn't exist"


@pytest.mark.parametrize(("src_mode", "dst_mode"), [
    ("Filesystem", "Filesystem"), ("Filesystem", "Block"), ("Block", "Filesystem"),
])
def test_host_assisted_copy(server: Server, tmp_path: Path, src_mode: str,
                            dst_mode: str) -> None:
    raw = _source(server, tmp_path, "src", cls="local", mode=src_mode)
    dv = _clone("dst", "src", cls="local", size=None, mode=dst_mode)
    assert server.create(dv).status_code == 201
    seen = _phases(server, "dst")
    assert seen[-1] == "Succeeded", seen
    reasons = [r for r, _ in _events(server, "dst")]
    assert "CloneScheduled" in reasons and "CloneInProgress" in reasons, reasons
    assert qemu_img.compare(str(raw), str(volume_of(server, "dst")))
    ann = server.get("pvc", "dst")["metadata"]["annotations"]
    assert (ann[A + "cloneType"], ann["k8s.io/CloneRequest"]) == ("copy", "default/src")
    # The workers are gone.
    for pod in ("cdi-upload-dst", f"{server.get('dv', 'dst')['metadata']['uid']}-source-pod"):
        deadline = time.monotonic() + 20
        while server.session.get(server.path("pod", pod), timeout=10).status_code != 404:
            assert time.monotonic() < deadline, pod
            time.sleep(0.1)


def test_clone_across_namespaces_is_copied(reflink_server: Server, tmp_path: Path) -> None:
    server = reflink_server
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "golden-images"}}
    assert server.create(ns).status_code in (201, 409)
    raw = _source(server, tmp_path, "fedora", cls="local-reflink", namespace="golden-images")
    dv = _clone("mine", "fedora", cls="local-reflink", source_namespace="golden-images")
    assert server.create(dv).status_code == 201
    seen = _phases(server, "mine")
    assert seen[-1] == "Succeeded", seen
    ann = server.get("pvc", "mine")["metadata"]["annotations"]
    assert (ann[A + "cloneType"], ann[A + "cloneFallbackReason"]) == (
        "copy", "Snapshot and CSI clones across namespaces are copied on the embedded backend")
    assert qemu_img.compare(str(raw), str(volume_of(server, "mine")))


def _snapshot(server: Server, name: str, claim: str) -> None:
    snap = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            "spec": {"source": {"persistentVolumeClaimName": claim}}}
    assert server.create(snap).status_code == 201
    server.wait_for("volumesnapshot", name,
                    lambda o: (o.get("status") or {}).get("readyToUse") is True)


def test_snapshot_source_and_datasource_ref(reflink_server: Server, tmp_path: Path) -> None:
    server = reflink_server
    raw = _source(server, tmp_path, "golden", cls="local-reflink")
    _snapshot(server, "golden-snap", "golden")
    from_snap = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                 "metadata": {"name": "restored"},
                 "spec": {"source": {"snapshot": {"name": "golden-snap"}},
                          "storage": {"storageClassName": "local-reflink"}}}
    assert server.create(from_snap).status_code == 201
    ds = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
          "metadata": {"name": "golden-ds"},
          "spec": {"source": {"pvc": {"name": "golden", "namespace": "default"}}}}
    by_ref = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": "vm-disk"},
              "spec": {"sourceRef": {"kind": "DataSource", "name": "golden-ds"},
                       "storage": {"storageClassName": "local-reflink",
                                   "resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(by_ref).status_code == 201
    dv = server.wait_for("dv", "vm-disk",
                         lambda o: condition(o, "Running").get("reason") == "CloneWithoutSource")
    assert condition(dv, "Running")["message"] == "DataSource default/golden-ds not found"
    assert server.create(ds).status_code == 201
    for name, kind in (("restored", "snapshot"), ("vm-disk", "csi-clone")):
        seen = _phases(server, name)
        assert seen[-1] == "Succeeded", (name, seen)
        assert server.get("pvc", name)["metadata"]["annotations"][A + "cloneType"] == kind
        assert qemu_img.compare(str(raw), str(volume_of(server, name)))
    # The user's snapshot is theirs: it stays.
    assert server.get("volumesnapshot", "golden-snap")["status"]["readyToUse"] is True


def test_snapshot_of_another_driver_is_restored_then_copied(reflink_server: Server,
                                                            tmp_path: Path) -> None:
    server = reflink_server
    raw = _source(server, tmp_path, "golden", cls="local-reflink")
    _snapshot(server, "snap", "golden")
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "onlocal"},
          "spec": {"source": {"snapshot": {"name": "snap"}},
                   "storage": {"storageClassName": "local"}}}
    assert server.create(dv).status_code == 201
    seen = _phases(server, "onlocal")
    assert seen[-1] == "Succeeded", seen
    ann = server.get("pvc", "onlocal")["metadata"]["annotations"]
    assert (ann[A + "cloneType"], ann[A + "cloneFallbackReason"]) == (
        "copy", "The storageclass provisioner does not match the volumesnapshotcontent driver")
    assert qemu_img.compare(str(raw), str(volume_of(server, "onlocal")))
    uid = server.get("dv", "onlocal")["metadata"]["uid"]
    deadline = time.monotonic() + 20
    while server.session.get(server.path("pvc", f"tmp-source-pvc-{uid}"),
                             timeout=10).status_code != 404:
        assert time.monotonic() < deadline, "the temporary restore is removed"
        time.sleep(0.1)


def _wait_event(server: Server, name: str, reason: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while reason not in [r for r, _ in _events(server, name)]:
        assert time.monotonic() < deadline, (reason, _events(server, name), server.log())
        time.sleep(0.05)


def test_source_in_use_waits(server: Server, tmp_path: Path) -> None:
    """A source another pod uses is not copied until that pod is gone; a source not yet
    filled is not cloned at all until it is."""
    busy = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "busy"},
            "spec": {"source": {"upload": {}},
                     "storage": {"storageClassName": "local",
                                 "resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(busy).status_code == 201
    server.wait_for("dv", "busy", lambda o: phase(o) == "UploadReady")
    assert server.create(_clone("waiting", "busy", cls="local")).status_code == 201
    dv = server.wait_for("dv", "waiting", lambda o: condition(o, "Running").get("reason")
                         == "CloneSourceNotPopulated")
    assert (phase(dv), condition(dv, "Running")["message"]) == (
        "CloneScheduled", "The source pvc busy is not populated yet: DataVolume busy is "
                          "UploadReady")
    raw = images.make_raw(tmp_path / "busy.raw", virtual_size=64 * MiB,
                          extents=[(0, MiB), (50 * MiB, MiB)], seed=7)
    # A "VM" starts on the source before the upload is done: it holds the claim.
    vm = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "vm-busy"},
          "spec": {"restartPolicy": "Never",
                   "containers": [{"name": "vm", "image": "sleep", "command": ["sleep", "60"]}],
                   "volumes": [{"name": "disk",
                                "persistentVolumeClaim": {"claimName": "busy"}}]}}
    assert server.create(vm).status_code == 201
    p = server.cli("image-upload", "dv", "busy", "--no-create", "--image-path", str(raw))
    assert p.returncode == 0, p.stderr
    dv = server.wait_for("dv", "waiting",
                         lambda o: condition(o, "Running").get("reason") == "CloneSourceInUse")
    assert condition(dv, "Running")["message"] == "pvc busy is used by pods vm-busy"
    assert server.session.delete(server.path("pod", "vm-busy"), timeout=10).status_code == 200
    seen = _phases(server, "waiting")
    assert seen[-1] == "Succeeded", seen
    assert qemu_img.compare(str(raw), str(volume_of(server, "waiting")))


def test_killed_cdi_serve_mid_copy_finishes_after_restart(server: Server,
                                                          tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "big.raw", virtual_size=1024 * MiB,
                          extents=[(i * 128 * MiB, 48 * MiB) for i in range(8)], seed=11)
    p = server.cli("image-upload", "dv", "bigsrc", "--image-path", str(raw), "--size", "1Gi",
                   "--storage-class", "local")
    assert p.returncode == 0, p.stderr
    assert server.create(_clone("bigcopy", "bigsrc", cls="local", size="1Gi")).status_code == 201
    _wait_event(server, "bigcopy", "CloneInProgress")
    server.stop(signal.SIGKILL)
    server.start()
    seen = _phases(server, "bigcopy", timeout=180)
    assert seen[-1] == "Succeeded", seen
    assert qemu_img.compare(str(raw), str(volume_of(server, "bigcopy")))
    assert images.allocated_bytes(volume_of(server, "bigcopy")) <= 400 * MiB, "stays sparse"


def test_source_deleted_mid_copy_never_leaves_half_a_copy(server: Server,
                                                         tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "src.raw", virtual_size=1024 * MiB,
                          extents=[(i * 128 * MiB, 48 * MiB) for i in range(8)], seed=12)
    p = server.cli("image-upload", "dv", "doomed", "--image-path", str(raw), "--size", "1Gi",
                   "--storage-class", "local")
    assert p.returncode == 0, p.stderr
    assert server.create(_clone("survivor", "doomed", cls="local", size="1Gi")).status_code == 201
    _wait_event(server, "survivor", "CloneInProgress")
    r = server.session.delete(server.path("dv", "doomed"), timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 120
    while True:
        dv = server.get("dv", "survivor")
        if phase(dv) == "Succeeded":
            # What was read before the delete is the whole source (open files stay
            # readable): the copy is complete, not half of one.
            assert qemu_img.compare(str(raw), str(volume_of(server, "survivor")))
            break
        reason = condition(dv, "Running").get("reason")
        if reason == "CloneWithoutSource":
            assert condition(dv, "Running")["message"] == "The source pvc doomed doesn't exist"
            break
        assert time.monotonic() < deadline, dv["status"]
        time.sleep(0.1)


@pytest.mark.parametrize(("case", "reason", "message"), [
    ("modes", "IncompatibleVolumeModes",
     "The volume modes of source and target are incompatible"),
    ("expansion", "NoVolumeExpansion", "No volume expansion is possible"),
    ("provisioners", "IncompatibleProvisioners", "Provisioners are incompatible"),
])
def test_csi_clone_fallbacks_on_real_clones(reflink_server: Server, tmp_path: Path, case: str,
                                            reason: str, message: str) -> None:
    server = reflink_server
    fixed = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
             "metadata": {"name": "reflink-fixed"},
             "provisioner": "cdi.kubevirt.io/local-reflink", "reclaimPolicy": "Delete",
             "volumeBindingMode": "Immediate", "allowVolumeExpansion": False}
    assert server.create(fixed).status_code == 201
    for cls in ("local-reflink", "reflink-fixed"):
        r = server.session.patch(server.path("storageprofile", cls, ""), timeout=10,
                                 json={"spec": {"cloneStrategy": "csi-clone"}},
                                 headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        server.wait_for("storageprofile", cls,
                        lambda o: o.get("status", {}).get("cloneStrategy") == "csi-clone",
                        namespace="")
    source_class = "local" if case == "provisioners" else (
        "reflink-fixed" if case == "expansion" else "local-reflink")
    raw = _source(server, tmp_path, "src", cls=source_class)
    target = {"modes": _clone("dst", "src", cls="local-reflink", mode="Block", size="128Mi"),
              "expansion": _clone("dst", "src", cls="reflink-fixed", size="128Mi"),
              "provisioners": _clone("dst", "src", cls="local-reflink")}[case]
    assert server.create(target).status_code == 201
    seen = _phases(server, "dst")
    assert seen[-1] == "Succeeded", seen
    ann = server.get("pvc", "dst")["metadata"]["annotations"]
    assert (ann[A + "cloneType"], ann[A + "cloneFallbackReason"]) == ("copy", message)
    assert (reason, message) in _events(server, "dst")
    assert qemu_img.compare(str(raw), str(volume_of(server, "dst")))


def test_controller_annotations_on_a_datavolume_are_not_passed_on(server: Server,
                                                                 tmp_path: Path) -> None:
    """A DataVolume cannot name a claim for the controller to delete, nor fake a result."""
    raw = _source(server, tmp_path, "golden", cls="local")
    victim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": "victim"},
              "spec": {"accessModes": ["ReadWriteOnce"],
                       "resources": {"requests": {"storage": "8Mi"}}}}
    assert server.create(victim).status_code == 201
    dv = _clone("sneaky", "golden", cls="local")
    dv["metadata"]["annotations"] = {A + "cloneSourceTemporaryClaim": "victim",
                                     A + "storage.pod.phase": "Succeeded"}
    assert server.create(dv).status_code == 201
    seen = _phases(server, "sneaky")
    assert seen[-1] == "Succeeded", seen
    assert qemu_img.compare(str(raw), str(volume_of(server, "sneaky")))
    ann = server.get("pvc", "sneaky")["metadata"]["annotations"]
    assert A + "cloneSourceTemporaryClaim" not in ann
    assert server.get("pvc", "victim")["status"]["phase"] == "Bound"


def test_deleting_a_clone_mid_copy_removes_its_workers(server: Server, tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "src.raw", virtual_size=1024 * MiB,
                          extents=[(i * 128 * MiB, 48 * MiB) for i in range(8)], seed=13)
    p = server.cli("image-upload", "dv", "src", "--image-path", str(raw), "--size", "1Gi",
                   "--storage-class", "local")
    assert p.returncode == 0, p.stderr
    assert server.create(_clone("gone", "src", cls="local", size="1Gi")).status_code == 201
    _wait_event(server, "gone", "CloneInProgress")
    uid = server.get("dv", "gone")["metadata"]["uid"]
    assert server.session.delete(server.path("dv", "gone"), timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    for kind, name in (("pod", f"{uid}-source-pod"), ("secret", f"{uid}-source-pod"),
                       ("pod", "cdi-upload-gone"), ("pvc", "gone")):
        while server.session.get(server.path(kind, name), timeout=10).status_code != 404:
            assert time.monotonic() < deadline, (kind, name)
            time.sleep(0.1)
    # The source is free again: a new clone of it is not held up.
    assert server.create(_clone("again", "src", cls="local", size="1Gi")).status_code == 201
    seen = _phases(server, "again", timeout=120)
    assert seen[-1] == "Succeeded", seen


def test_host_assisted_copy_goes_over_the_private_unix_socket(server: Server,
                                                              tmp_path: Path) -> None:
    """In cdi serve the source worker reaches the upload server's Unix socket, plain HTTP:
    the socket is 0600 in a 0700 directory of the data dir, the source pod gets no client
    certificate, and the socket is gone with the upload server."""
    raw = images.make_raw(tmp_path / "src.raw", virtual_size=1024 * MiB,
                          extents=[(i * 128 * MiB, 48 * MiB) for i in range(8)], seed=14)
    p = server.cli("image-upload", "dv", "src", "--image-path", str(raw), "--size", "1Gi",
                   "--storage-class", "local")
    assert p.returncode == 0, p.stderr
    assert server.create(_clone("local", "src", cls="local", size="1Gi")).status_code == 201
    uid = server.get("dv", "local")["metadata"]["uid"]
    source = server.wait_for("pod", f"{uid}-source-pod", lambda o: True)
    upload = server.get("pod", "cdi-upload-local")
    sock = Path(upload["metadata"]["annotations"]["embedded.cdi.kubevirt.io/upload-socket"])
    assert sock.parent == server.data_dir / "run"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    env = {e["name"]: e.get("value") for e in source["spec"]["containers"][0]["env"]}
    assert env["UPLOAD_SOCKET"] == str(sock)
    assert "CLIENT_CERT_FILE" not in env and "SERVER_CA_FILE" not in env
    assert server.session.get(server.path("secret", f"{uid}-source-pod"),
                              timeout=10).status_code == 404
    if sock.exists():  # the copy may be over already
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
    seen = _phases(server, "local", timeout=120)
    assert seen[-1] == "Succeeded", seen
    assert qemu_img.compare(str(raw), str(volume_of(server, "local")))
    assert images.allocated_bytes(volume_of(server, "local")) <= 400 * MiB, "stays sparse"
    deadline = time.monotonic() + 20
    while sock.exists():
        assert time.monotonic() < deadline, "the socket outlives its upload server"
        time.sleep(0.1)
