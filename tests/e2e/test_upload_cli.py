"""`cdi image-upload` modes and flags end to end: pvc mode, --force-bind,
--datasource, --no-create, the terminal progress bar, and upload progress in
the DataVolume's status."""

from __future__ import annotations

import os
import pty
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from importer import qemu_img
from tests.e2e.conftest import Server, phase
from tests.e2e.test_datavolume import volume_of
from tests.e2e.test_upload import _proxy, _token
from tests.support import images

MiB = 1 << 20
A = "cdi.kubevirt.io/"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return images.make_raw(tmp_path / "disk.raw", virtual_size=32 * MiB,
                           extents=[(0, MiB), (20 * MiB, 2 * MiB)])


def test_pvc_mode_uploads_into_a_bare_claim(server: Server, raw: Path, tmp_path: Path) -> None:
    qcow2 = images.convert(raw, tmp_path / "disk.qcow2", "qcow2")
    p = server.cli("image-upload", "pvc", "bare", "--image-path", str(qcow2), "--size", "64Mi")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "PVC default/bare Succeeded"
    assert "PVC default/bare created" in p.stderr
    pvc = server.get("pvc", "bare")
    ann = pvc["metadata"]["annotations"]
    assert (ann[A + "storage.upload.target"], ann[A + "storage.pod.phase"],
            ann[A + "storage.condition.running.message"]) == ("", "Succeeded", "Upload Complete")
    assert "ownerReferences" not in pvc["metadata"]
    assert qemu_img.compare(str(raw), str(volume_of(server, "bare")))
    # The upload server is gone once it is done, and a second upload is refused.
    deadline = time.monotonic() + 30
    while server.session.get(server.path("pod", "cdi-upload-bare"), timeout=10).status_code \
            != 404:
        assert time.monotonic() < deadline, "the upload pod was not removed"
        time.sleep(0.1)
    again = server.cli("image-upload", "pvc", "bare", "--no-create", "--image-path", str(raw))
    assert (again.returncode, again.stderr.strip().splitlines()[-1]) == (
        1, "error: PVC default/bare has already been uploaded to")
    events = server.session.get(server.url + "/api/v1/namespaces/default/events",
                                timeout=10).json()["items"]
    assert [e["reason"] for e in events
            if e["involvedObject"]["name"] == "bare"] == ["UploadSucceeded"]


def test_pvc_mode_no_create_and_refusals(server: Server, raw: Path) -> None:
    claim: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "mine", "annotations": {A + "storage.upload.target": ""}},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "64Mi"}}}}
    assert server.create(claim).status_code == 201
    p = server.cli("image-upload", "pvc", "mine", "--no-create", "--image-path", str(raw))
    assert p.returncode == 0, p.stderr
    assert qemu_img.compare(str(raw), str(volume_of(server, "mine")))
    # A claim that is not an upload target, and one that does not exist.
    plain = {**claim, "metadata": {"name": "plain"}}
    assert server.create(plain).status_code == 201
    p = server.cli("image-upload", "pvc", "plain", "--no-create", "--image-path", str(raw),
                   "--wait-secs", "5")
    assert (p.returncode, p.stderr.strip()) == (
        1, "error: PVC default/plain is not an upload target "
           "(it has no cdi.kubevirt.io/storage.upload.target annotation)")
    p = server.cli("image-upload", "pvc", "ghost", "--no-create", "--image-path", str(raw))
    assert (p.returncode, p.stderr.strip()) == (
        1, "error: PVC default/ghost does not exist (--no-create uploads into an existing one)")
    p = server.cli("image-upload", "dv", "ghost", "--no-create", "--image-path", str(raw))
    assert (p.returncode, p.stderr.strip()) == (
        1, "error: DataVolume default/ghost does not exist "
           "(--no-create uploads into an existing one)")
    p = server.cli("image-upload", "pvc", "mine", "--image-path", str(raw))
    assert (p.returncode, p.stderr.strip()) == (
        1, "error: PVC default/mine already exists (use --no-create to upload into it)")


def _wffc(server: Server) -> None:
    """Make local-wffc the default class, so claims without a class wait for a consumer."""
    for sc, default in (("local", "false"), ("local-wffc", "true")):
        r = server.session.patch(server.path("storageclass", sc, ""), timeout=10, json={
            "metadata": {"annotations": {
                "storageclass.kubernetes.io/is-default-class": default}}},
            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text


def test_force_bind_on_a_wait_for_first_consumer_class(server: Server, raw: Path) -> None:
    p = server.cli("image-upload", "dv", "waits", "--image-path", str(raw),
                   "--storage-class", "local-wffc", "--wait-secs", "3")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "error: timed out waiting for DataVolume default/waits to be UploadReady "
        "(it is WaitForFirstConsumer)")
    p = server.cli("image-upload", "dv", "forced", "--image-path", str(raw),
                   "--storage-class", "local-wffc", "--force-bind")
    assert p.returncode == 0, p.stderr
    dv = server.get("dv", "forced")
    assert dv["metadata"]["annotations"][A + "storage.bind.immediate.requested"] == "true"
    assert qemu_img.compare(str(raw), str(volume_of(server, "forced")))


def test_datasource_points_at_the_uploaded_volume(server: Server, raw: Path) -> None:
    p = server.cli("image-upload", "dv", "golden", "--image-path", str(raw), "--datasource")
    assert p.returncode == 0, p.stderr
    assert "DataSource default/golden created" in p.stderr
    ds = server.get("datasource", "golden")
    assert ds["spec"]["source"] == {"pvc": {"name": "golden", "namespace": "default"}}


def _run_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; return (exit code, what it drew)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=follower,
                            stdin=subprocess.DEVNULL)
    os.close(follower)
    drawn = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    return proc.wait(timeout=120), drawn.decode(errors="replace")


def test_progress_bar_on_a_terminal_and_lines_otherwise(server: Server, raw: Path) -> None:
    code, drawn = _run_on_a_terminal(
        ["cdi", "image-upload", "dv", "tty", "--image-path", str(raw)], server.env)
    assert code == 0, drawn
    assert "\r[##############################] 100.0%  32.0 MiB / 32.0 MiB" in drawn
    p = server.cli("image-upload", "dv", "notty", "--image-path", str(raw))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "\r" not in p.stderr and "[#" not in p.stderr
    assert any(line.startswith("  32.0 MiB / 32.0 MiB") for line in lines), lines


class _SlowBody:
    """The file a MiB at a time with a pause after each: a slow client, with a length."""

    def __init__(self, path: Path, per_chunk: float) -> None:
        self._path = path
        self._pause = per_chunk

    def __len__(self) -> int:
        return self._path.stat().st_size

    def __iter__(self) -> Iterator[bytes]:
        with self._path.open("rb") as f:
            while chunk := f.read(MiB):
                yield chunk
                time.sleep(self._pause)


def test_upload_progress_in_datavolume_status(server: Server, raw: Path) -> None:
    """While the bytes arrive, the DataVolume shows them, with a rate: never "N/A"."""
    dv: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "watched"},
        "spec": {"source": {"upload": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "watched", lambda o: phase(o) == "UploadReady")
    url, ca = _proxy(server)
    seen: list[dict[str, Any]] = []
    with requests.Session() as s:
        result: list[requests.Response] = []
        t = threading.Thread(target=lambda: result.append(s.post(
            f"{url}/v1beta1/upload", data=_SlowBody(raw, 0.25), verify=ca, timeout=120,
            headers={"Authorization": f"Bearer {_token(server, 'watched')}"})))
        t.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and t.is_alive():
                status = server.get("dv", "watched").get("status", {})
                if status.get("transfer", {}).get("bytesPerSecond"):
                    seen.append(status)
                    if len(seen) >= 2:
                        break
                time.sleep(0.2)
        finally:
            t.join(timeout=120)
    assert result and result[0].status_code == 200, result and result[0].text
    assert len(seen) >= 2, "no progress with a rate appeared in the status"
    first, later = seen[0], seen[-1]
    assert first["phase"] == "UploadReady"
    assert first["progress"] != "N/A" and first["progress"].endswith("%")
    assert 0 < first["transfer"]["bytesRead"] <= later["transfer"]["bytesRead"] < 32 * MiB
    assert first["transfer"]["bytesTotal"] == 32 * MiB
    # About 4 MiB/s are sent; the rate shown is of that order, not 0 and not absurd.
    assert MiB // 2 < later["transfer"]["bytesPerSecond"] < 64 * MiB
    server.wait_for("dv", "watched", lambda o: phase(o) == "Succeeded")
    final = server.get("dv", "watched")["status"]
    assert (final["progress"], "transfer" in final) == ("100.0%", False)
    assert qemu_img.compare(str(raw), str(volume_of(server, "watched")))
