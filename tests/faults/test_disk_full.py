"""The disk fills up under an upload: a clear failure, nothing kept, and a retry works.

The volume's filesystem is a 24 MiB tmpfs (``tests.support.xfs.tmpfs``, root
as in CI) and the image 16 MiB of random data, so the upload server's space
check passes; a quarter of the way in, another writer takes all the free
space.  The real upload server must answer with CDI's capacity text and the
"no space left on device" reason, remove the half-written disk, stay up, and
take the whole upload once the space is back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.importer.conftest import Volume
from tests.support import uploadserver
from tests.support.xfs import tmpfs

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Volume]:
    with tmpfs(tmp_path, size="24M") as mnt:
        vol = Volume(mnt / "vol")
        vol.prepare()
        yield vol


def _body(data: bytes, fill: Path) -> Iterator[bytes]:
    """DATA in 1 MiB pieces; after the first quarter another writer takes the free space."""
    for i in range(0, len(data), MiB):
        if i == len(data) // 4:
            with fill.open("wb") as f:
                with contextlib.suppress(OSError):  # ENOSPC: the disk is full, as wanted
                    for _ in range(64):
                        f.write(bytes(MiB))
                        f.flush()
        yield data[i:i + MiB]


def test_upload_onto_a_disk_that_fills_up(small_volume: Volume, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    # The log stays off the small filesystem, which is about to be full.
    proc, base = uploadserver.start(small_volume, image_size="16Mi",
                                    log=tmp_path / "server.log")
    try:
        url = f"{base}/v1beta1/upload"
        filler = small_volume.root / "filler"
        answer = requests.post(url, data=_body(data, filler), timeout=60)
        assert (answer.status_code, answer.text) == (
            400, "Saving stream failed: effective image size is larger than the reported "
                 f"available storage: writing {small_volume.disk}: no space left on device")
        assert list(small_volume.data_dir.iterdir()) == [], "the half-written disk is removed"
        assert proc.poll() is None, "the upload server waits for another try"
        # Space comes back: the same upload server takes the upload again, whole.
        filler.unlink()
        answer = requests.post(url, data=data, timeout=60)
        assert (answer.status_code, answer.text) == (200, "")
        assert small_volume.disk.read_bytes()[:SIZE] == data
    finally:
        proc.kill()
        proc.wait()
