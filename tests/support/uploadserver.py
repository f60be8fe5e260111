"""Start the real upload server (``python -m importer.uploadserver``) on a test volume.

For tests outside ``tests/importer/test_uploadserver.py`` (whose ``start``
fixture adds TLS and more) that need an upload server in plain HTTP on
127.0.0.1 and its URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.importer.conftest import Volume


def start(vol: Volume, *, image_size: str, log: Path | None = None
          ) -> tuple[subprocess.Popen[bytes], str]:
    """The server's process and ``http://127.0.0.1:<port>``; the caller kills it.

    Its output goes to LOG (default: ``server.log`` in the volume's root).
    """
    address = vol.root / "address"
    log = log or vol.root / "server.log"
    env = {**os.environ, **vol.env(), "LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "0",
           "UPLOAD_ADDRESS_FILE": str(address), "UPLOAD_IMAGE_SIZE": image_size}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "importer.uploadserver"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not address.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the upload server did not start:\n{log.read_text()}")
        time.sleep(0.02)
    return proc, f"http://{address.read_text().strip()}"
