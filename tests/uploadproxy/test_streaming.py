"""A 64 MiB upload streams through the proxy without the proxy's memory growing with it.

The proxy runs in a subprocess of its own (started from a tiny script), so its
resident set can be read from ``/proc/<pid>/status`` without the test's own
allocations (the 64 MiB file, requests, the stand-in upload server) in it.
The upload server pauses for a second after 8 MiB: without backpressure the
proxy would have to hold what the client keeps sending meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from tests.uploadproxy.servers import Upstream

MiB = 1024 * 1024
SIZE = 64 * MiB
MAX_GROWTH = 20 * MiB
REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import asyncio, sys
    from pathlib import Path
    from aiohttp import web
    from cdi.api import tokens
    from uploadproxy import UploadTarget, create_app

    class Fixed:
        async def upload_server(self, namespace, pvc):
            if sys.argv[2].startswith("unix:"):
                return UploadTarget("https://127.0.0.1:1", socket=sys.argv[2][5:])
            return UploadTarget(sys.argv[2])

    async def main():
        key = tokens.load_public_key(Path(sys.argv[1]).read_bytes())
        runner = web.AppRunner(create_app(public_key=key, resolver=Fixed()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())
''')


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            time.sleep(0.005)


def test_64_mib_streams_in_bounded_memory(tmp_path: Path, signing_key: rsa.RSAPrivateKey,
                                          upstream: tuple[Upstream, str],
                                          http: requests.Session) -> None:
    server, upstream_url = upstream
    image = tmp_path / "disk.img"
    digest = hashlib.sha256()
    with image.open("wb") as f:
        for _ in range(SIZE // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    public = tmp_path / "token.pub"
    public.write_bytes(tokens.public_key_pem(signing_key))
    script = tmp_path / "proxy.py"
    script.write_text(SCRIPT)
    token = tokens.issue(signing_key, namespace="ns", name="disk")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

    with (tmp_path / "proxy.log").open("wb") as log, subprocess.Popen(
        [sys.executable, str(script), str(public), upstream_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            port = int(proc.stdout.readline())
            proxy = f"http://127.0.0.1:{port}"
            # Warm up: imports, first connection, buffers.
            assert http.post(f"{proxy}/v1beta1/upload", data=b"w" * (4 * MiB),
                             headers=headers).status_code == 200
            baseline = _rss(proc.pid)

            server.pause = (8 * MiB, 1.0)
            sampler = _Sampler(proc.pid)
            sampler.start()
            started = time.monotonic()
            with image.open("rb") as body:
                response = http.post(f"{proxy}/v1beta1/upload", data=body, headers=headers)
            elapsed = time.monotonic() - started
            sampler.done.set()
            sampler.join()
        finally:
            proc.stdin.close()
            proc.wait(30)

    assert (response.status_code, response.text) == (200, "upload ok")
    seen = server.seen[-1]
    assert seen.size == SIZE and seen.sha256 == digest.hexdigest()
    assert seen.headers["Content-Length"] == str(SIZE)
    growth = sampler.peak - baseline
    print(f"\nproxy RSS baseline {baseline / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB, "
          f"growth {growth / MiB:.1f} MiB for a {SIZE // MiB} MiB upload in {elapsed:.2f} s")
    assert elapsed >= 1.0, "the upload server's pause did not hold the upload back"
    assert growth < MAX_GROWTH
