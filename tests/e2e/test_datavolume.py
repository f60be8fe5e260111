"""DataVolumes end to end: a real `cdi serve`, real HTTP servers, real workers."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20


def http_dv(name: str, url: str, size: str = "128Mi", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"http": {"url": url}},
                     "storage": {"resources": {"requests": {"storage": size}}}, **spec}}


def volume_of(server: Server, pvc_name: str) -> Path:
    pvc = server.get("pvc", pvc_name)
    pv = pvc["spec"]["volumeName"]
    block = pvc["spec"].get("volumeMode") == "Block"
    return server.data_dir / "volumes" / (f"{pv}.img" if block else f"{pv}/disk.img")


@pytest.fixture
def qcow2(http_server: FileServer) -> Path:
    raw = images.make_raw(http_server.root / "disk.raw", virtual_size=64 * MiB,
                          extents=[(0, MiB), (20 * MiB, 2 * MiB)])
    images.convert(raw, http_server.root / "disk.qcow2", "qcow2")
    return raw


def test_http_import_succeeds(server: Server, http_server: FileServer, qcow2: Path) -> None:
    r = server.create(http_dv("fedora", http_server.url("disk.qcow2")))
    assert r.status_code == 201, r.text
    dv = server.wait_for("dv", "fedora", lambda o: phase(o) == "Succeeded")
    assert dv["status"]["progress"] == "100.0%"
    assert condition(dv, "Ready")["status"] == "True"
    assert (condition(dv, "Running")["reason"], condition(dv, "Running")["message"]) == (
        "Completed", "Import Complete")
    assert (condition(dv, "Bound")["status"], condition(dv, "Bound")["message"]) == (
        "True", "PVC fedora Bound")
    disk = volume_of(server, "fedora")
    assert qemu_img.compare(str(qcow2), str(disk))
    # storage: 128Mi inflated by the 6% default overhead, then deflated by the worker.
    pvc = server.get("pvc", "fedora")
    assert pvc["spec"]["resources"]["requests"]["storage"] == str(
        int(128 * MiB * 1.06) + (1 if (128 * MiB * 106) % 100 else 0))
    assert disk.stat().st_size == 128 * MiB
    # The worker pod is gone once the import is done.
    assert server.session.get(server.path("pod", "importer-fedora")).status_code == 404


def test_404_retries_then_succeeds(server: Server, http_server: FileServer, qcow2: Path) -> None:
    late = http_server.root / "late.qcow2"
    r = server.create(http_dv("late", http_server.url("late.qcow2")))
    assert r.status_code == 201, r.text
    dv = server.wait_for("dv", "late", lambda o: o.get("status", {}).get("restartCount", 0) >= 2)
    assert phase(dv) == "ImportInProgress"
    running = condition(dv, "Running")
    assert (running["status"], running["reason"]) == ("False", "Error")
    assert running["message"] == ("Unable to connect to http data source: expected status code "
                                  "200, got 404. Status: 404 Not Found")
    (http_server.root / "disk.qcow2").rename(late)
    dv = server.wait_for("dv", "late", lambda o: phase(o) == "Succeeded")
    assert dv["status"]["restartCount"] >= 2
    assert qemu_img.compare(str(qcow2), str(volume_of(server, "late")))


def test_blank_and_preallocation(server: Server) -> None:
    for name, prealloc in (("blank", False), ("blank-prealloc", True)):
        dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
              "metadata": {"name": name},
              "spec": {"source": {"blank": {}}, "preallocation": prealloc,
                       "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
        assert server.create(dv).status_code == 201
    for name, prealloc in (("blank", False), ("blank-prealloc", True)):
        server.wait_for("dv", name, lambda o: phase(o) == "Succeeded")
        disk = volume_of(server, name)
        assert disk.stat().st_size == 64 * MiB
        allocated = images.allocated_bytes(disk)
        assert allocated >= 64 * MiB if prealloc else allocated < MiB
        ann = server.get("pvc", name)["metadata"]["annotations"]
        assert ann["cdi.kubevirt.io/storage.preallocation"] == str(prealloc).lower()


def test_target_too_small(server: Server, http_server: FileServer, qcow2: Path) -> None:
    assert server.create(http_dv("small", http_server.url("disk.qcow2"), size="16Mi")
                         ).status_code == 201
    dv = server.wait_for("dv", "small", lambda o: condition(o, "Running").get("reason") == "Error")
    assert condition(dv, "Running")["message"] == "DataVolume too small to contain image"
    assert phase(dv) == "ImportInProgress"


@pytest.mark.parametrize("immediate", [False, True])
def test_wait_for_first_consumer(server: Server, http_server: FileServer, qcow2: Path,
                                 immediate: bool) -> None:
    dv = http_dv("wffc", http_server.url("disk.qcow2"))
    dv["spec"]["storage"]["storageClassName"] = "local-wffc"
    if immediate:
        dv["metadata"]["annotations"] = {"cdi.kubevirt.io/storage.bind.immediate.requested": ""}
    assert server.create(dv).status_code == 201
    if immediate:
        server.wait_for("dv", "wffc", lambda o: phase(o) == "Succeeded")
    else:
        server.wait_for("dv", "wffc", lambda o: phase(o) == "WaitForFirstConsumer")
        time.sleep(1)
        assert phase(server.get("dv", "wffc")) == "WaitForFirstConsumer"
        assert server.get("pvc", "wffc")["status"]["phase"] == "Pending"


def test_checksum_mismatch_fails_for_good(server: Server, http_server: FileServer,
                                          qcow2: Path) -> None:
    dv = http_dv("bad-sum", http_server.url("disk.raw"))
    dv["spec"]["source"]["http"]["checksum"] = "sha256:" + "0" * 64
    assert server.create(dv).status_code == 201
    dv = server.wait_for("dv", "bad-sum", lambda o: phase(o) == "Failed")
    running = condition(dv, "Running")
    assert running["reason"] == "ChecksumError"
    assert running["message"].startswith("Unable to process data: checksum validation failed: "
                                         "checksum mismatch: expected sha256:" + "0" * 64)


def test_kill_9_and_restart(server: Server, http_server: FileServer, qcow2: Path,
                            tmp_path: Path) -> None:
    big = images.make_raw(http_server.root / "big.raw", virtual_size=256 * MiB,
                          extents=[(0, 32 * MiB), (128 * MiB, 32 * MiB)])
    http_server.configure("big.raw", stall_after=8 * MiB, stall_seconds=60)
    dv = http_dv("survivor", http_server.url("big.raw"), size="300Mi")
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "survivor", lambda o: phase(o) == "ImportInProgress")
    server.stop(signal.SIGKILL)
    # The killed server's worker does not outlive it (and is not left writing).
    deadline = time.monotonic() + 15
    while _workers_of(server.data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers_of(server.data_dir) == []
    http_server.configure("big.raw")  # the server is fine again
    server.start()
    dv = server.wait_for("dv", "survivor", lambda o: phase(o) == "Succeeded", timeout=120)
    assert qemu_img.compare(str(big), str(volume_of(server, "survivor")))
    assert dv["status"]["restartCount"] >= 1


def _workers_of(data_dir: Path) -> list[int]:
    """Pids of importer processes working in DATA_DIR."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes()
            environ = (p / "environ").read_bytes()
        except OSError:
            continue
        if b"importer" in cmdline and str(data_dir).encode() in environ:
            found.append(int(p.name))
    return found


def test_fifty_at_once(server: Server, http_server: FileServer, qcow2: Path) -> None:
    docs = [http_dv(f"dv-{i:02d}", http_server.url("disk.qcow2"), size="70Mi")
            for i in range(50)]
    stream = "\n---\n".join(json.dumps(d) for d in docs)
    p = server.cli("apply", "-f", "-", input=stream)
    assert p.returncode == 0, p.stderr
    for d in docs:
        server.wait_for("dv", d["metadata"]["name"], lambda o: phase(o) == "Succeeded",
                        timeout=240)
    for d in docs[:3]:
        assert qemu_img.compare(str(qcow2), str(volume_of(server, d["metadata"]["name"])))


def test_watch_sees_every_phase(server: Server, http_server: FileServer, qcow2: Path) -> None:
    phases: list[str] = []
    listed = server.session.get(server.path("dv"), timeout=10).json()
    rv = listed["metadata"]["resourceVersion"]

    def watch() -> None:
        with server.session.get(server.path("dv"), params={
                "watch": "true", "resourceVersion": rv, "timeoutSeconds": "60"},
                stream=True, timeout=70) as r:
            for line in r.iter_lines():
                event = json.loads(line)
                p = event["object"].get("status", {}).get("phase", "")
                if p and (not phases or phases[-1] != p):
                    phases.append(p)
                if p == "Succeeded":
                    return

    t = threading.Thread(target=watch)
    t.start()
    assert server.create(http_dv("watched", http_server.url("disk.qcow2"))).status_code == 201
    t.join(timeout=90)
    assert phases[0] == "Pending" and phases[-1] == "Succeeded"
    assert "PVCBound" in phases and "ImportScheduled" in phases
    order = ["Pending", "PVCBound", "ImportScheduled", "ImportInProgress", "Succeeded"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases


def test_secrets_for_auth_and_headers(server: Server, http_server: FileServer,
                                      qcow2: Path) -> None:
    http_server.configure("disk.raw", auth=("alice", "s3cret"))
    dv = http_dv("private", http_server.url("disk.raw"))
    dv["spec"]["source"]["http"].update({"secretRef": "creds",
                                         "secretExtraHeaders": ["tenant-header"]})
    assert server.create(dv).status_code == 201
    waiting = server.wait_for("dv", "private", lambda o: condition(o, "Running").get("reason")
                              == "CreateContainerConfigError")
    assert condition(waiting, "Running")["message"] == 'secret "creds" not found'
    for name, data in (("creds", {"accessKeyId": "alice", "secretKey": "s3cret"}),
                       ("tenant-header", {"header": "X-Tenant: blue"})):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                  "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        assert server.create(secret).status_code == 201
    server.wait_for("dv", "private", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(qcow2), str(volume_of(server, "private")))
    gets = [r for r in http_server.requests_for("disk.raw", "GET") if r.status == 200]
    assert gets and all(r.headers.get("x-tenant") == "blue" for r in gets)
    # The secret never shows in the pod spec, the claim or the DataVolume.
    for kind in ("dv", "pvc"):
        assert "s3cret" not in json.dumps(server.get(kind, "private"))


def test_worker_pods_follow_the_cdi_workload_placement(server: Server) -> None:
    """CDI spec.workload reaches worker pods (a cluster schedules by it; `cdi serve` runs
    them here whatever it says), with the restricted security context."""
    toleration = {"key": "storage", "operator": "Exists", "effect": "NoSchedule"}
    cdi = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "CDI", "metadata": {"name": "cdi"},
           "spec": {"workload": {"nodeSelector": {"node-role/storage": ""},
                                 "tolerations": [toleration]}}}
    r = server.create(cdi)
    assert r.status_code == 201, r.text
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "placed"},
          "spec": {"source": {"upload": {}}, "priorityClassName": "vm-disks",
                   "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "placed", lambda o: phase(o) == "UploadReady")
    pod = server.get("pod", "cdi-upload-placed")
    assert pod["spec"]["nodeSelector"] == {"node-role/storage": ""}
    assert pod["spec"]["tolerations"] == [toleration]
    assert "affinity" not in pod["spec"]
    assert pod["spec"]["priorityClassName"] == "vm-disks"
    assert pod["spec"]["securityContext"]["runAsUser"] == 107
    service = server.get("service", "cdi-upload-placed")
    assert service["spec"]["selector"] == {
        "cdi.kubevirt.io/uploadTarget": server.get("pvc", "placed")["metadata"]["uid"]}
