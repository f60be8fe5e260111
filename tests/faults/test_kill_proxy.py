"""``kill -9`` of ``cdi serve`` (and with it the upload proxy) under ``cdi image-upload``.

``cdi serve`` runs on fixed ports, so that a restart comes back where the
client left it.  Once the upload server holds part of the image durably,
``cdi serve`` is killed with SIGKILL (its upload server dies with it) and
started again; ``cdi image-upload`` must ride it out with its retries, ask the
new upload server for the durable offset, continue from there and finish
with content equal to the image.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server
from tests.e2e.test_datavolume import volume_of
from tests.support import images

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "serve", "--address", f"127.0.0.1:{_free_port()}",
               "--upload-proxy-port", str(_free_port())).start()
    try:
        yield s
    finally:
        s.session.close()
        s.stop(signal.SIGKILL)


def test_image_upload_rides_out_a_killed_cdi_serve(serve: Server, tmp_path: Path) -> None:
    big = images.make_raw(tmp_path / "big.raw", virtual_size=1536 * MiB,
                          extents=[(0, 32 * MiB), (900 * MiB, 32 * MiB), (1500 * MiB, 16 * MiB)])
    proc = subprocess.Popen(["cdi", "image-upload", "dv", "survivor", "--image-path", str(big),
                             "--size", "2Gi", "--no-sparse"], env=serve.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        killed = False
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            r = serve.session.get(serve.path("pvc", "survivor"), timeout=10)
            if r.status_code != 200 or not r.json()["spec"].get("volumeName"):
                continue
            state = volume_of(serve, "survivor").parent / ".upload-state.json"
            try:
                offset = json.loads(state.read_text()).get("offset", 0)
            except (OSError, ValueError):
                continue
            if offset > 16 * MiB:
                serve.stop(signal.SIGKILL)
                killed = True
        assert killed, "the upload finished before the test could interrupt it"
        time.sleep(1.0)
        serve.start()
        _out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err + serve.log()
    assert "continuing at byte" in err
    resumed_at = int(err.split("continuing at byte ")[1].split()[0])
    assert resumed_at > 0, "it continued, it did not start again"
    assert qemu_img.compare(str(big), str(volume_of(serve, "survivor")))
