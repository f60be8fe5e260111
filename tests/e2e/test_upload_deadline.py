"""Upload server deadlines end to end: `cdi serve --upload-deadline` recycles an idle
upload pod (new pod, new certificate) without failing its DataVolume, and an upload
that runs past the new pod's deadline still completes."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from cdi.cli.main import main
from importer import qemu_img
from tests.e2e.conftest import Server, phase
from tests.e2e.test_datavolume import volume_of
from tests.e2e.test_upload import _proxy, _token
from tests.support import images

MiB = 1 << 20
DEADLINE = 6  # seconds an upload server waits for its upload


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return images.make_raw(tmp_path / "disk.raw", virtual_size=24 * MiB,
                           extents=[(0, MiB), (12 * MiB, 2 * MiB)])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "serve", "--upload-deadline", f"{DEADLINE}s").start()
    try:
        yield s
    finally:
        s.session.close()
        s.stop()


def _pod(server: Server, name: str) -> dict[str, Any] | None:
    r = server.session.get(server.path("pod", f"cdi-upload-{name}"), timeout=10)
    return r.json() if r.status_code == 200 else None


def _deadline(pod: dict[str, Any]) -> datetime.datetime:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return datetime.datetime.fromisoformat(env["DEADLINE"])


def _certificate(server: Server, name: str) -> str:
    return str(server.get("secret", f"cdi-upload-{name}")["data"]["tls.crt"])


def _recycled(server: Server, name: str) -> int:
    r = server.session.get(server.path("event"), timeout=10)
    r.raise_for_status()
    return sum(1 for e in r.json()["items"] if e["involvedObject"]["name"] == name
               and e["reason"] == "UploadServerRecycled")


def _left(pod: dict[str, Any]) -> float:
    return (_deadline(pod) - datetime.datetime.now(datetime.UTC)).total_seconds()


def test_an_idle_upload_server_is_replaced_and_a_later_upload_succeeds(
        server: Server, raw: Path) -> None:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "late"},
          "spec": {"source": {"upload": {}},
                   "storage": {"resources": {"requests": {"storage": "32Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "late", lambda o: phase(o) == "UploadReady")
    first = _pod(server, "late")
    assert first is not None
    made = datetime.datetime.fromisoformat(first["metadata"]["creationTimestamp"])
    assert abs((_deadline(first) - made).total_seconds() - DEADLINE) <= 1.5
    first_cert = _certificate(server, "late")

    # Nobody uploads: past its deadline the server stops, and a new pod with a new
    # certificate takes its place; the DataVolume waits for it, it does not fail.
    phases: set[str] = set()
    second: dict[str, Any] | None = None
    limit = time.monotonic() + DEADLINE + 60
    while time.monotonic() < limit:
        phases.add(phase(server.get("dv", "late")))
        pod = _pod(server, "late")
        if pod is not None and pod["metadata"]["uid"] != first["metadata"]["uid"] and \
                phase(server.get("dv", "late")) == "UploadReady":
            second = pod
            break
        time.sleep(0.1)
    assert second is not None, server.log()
    assert "Failed" not in phases
    assert _certificate(server, "late") != first_cert
    assert _recycled(server, "late") >= 1
    claim = server.get("pvc", "late")["metadata"]["annotations"]
    assert "cdi.kubevirt.io/storage.import.fatalError" not in claim
    assert server.get("dv", "late")["status"]["restartCount"] == 0

    # The upload: on a server with time left, and still sending after that server's
    # deadline, which does not cut an upload under way.
    while _left(second) < 3:  # a loaded machine: take the next server
        time.sleep(0.2)
        nxt = _pod(server, "late")
        if nxt is not None and nxt["metadata"]["uid"] != second["metadata"]["uid"]:
            second = nxt
    recycled = _recycled(server, "late")
    data = raw.read_bytes()
    seen: dict[str, Any] = {}

    def body() -> Iterator[bytes]:
        yield data[:MiB]
        time.sleep(_left(second) + 1.5)
        seen["pod"] = _pod(server, "late")
        for i in range(MiB, len(data), MiB):
            yield data[i:i + MiB]

    url, ca = _proxy(server)
    r = requests.post(f"{url}/v1beta1/upload", data=body(), verify=ca, timeout=120,
                      headers={"Authorization": f"Bearer {_token(server, 'late')}"})
    assert r.status_code == 200, r.text
    assert seen["pod"] is not None and seen["pod"]["metadata"]["uid"] == \
        second["metadata"]["uid"]  # past its deadline, the server was still there
    server.wait_for("dv", "late", lambda o: phase(o) == "Succeeded")
    assert _recycled(server, "late") == recycled
    assert qemu_img.compare(str(raw), str(volume_of(server, "late")))


@pytest.mark.parametrize("value", ["soon", "0s", "-5m"])
def test_an_upload_deadline_that_is_no_duration_is_refused(value: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--upload-deadline", value])
    assert result.exit_code == 2
    assert "--upload-deadline" in result.output and value in result.output
