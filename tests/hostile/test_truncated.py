"""Images cut short (a download that stopped, a file copied in half): refused, never half-imported.

Each format qemu-img converts is made from a raw image with data near its end,
then cut to half its size and served over real HTTP to the real worker.  The
import must fail with a message naming the problem and leave no volume: a
truncated image is never imported as if the missing part were zeros.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.hostile.conftest import UploadServer
from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.httpserver import FileServer

MiB = 1 << 20
FORMATS = ["qcow2", "vmdk", "vdi", "vpc", "vhdx"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_image_is_refused(fmt: str, http_server: FileServer,
                                    volume: Callable[..., Volume],
                                    import_in_process: Importer, tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "disk.raw", virtual_size=32 * MiB,
                          extents=[(0, 4 * MiB), (24 * MiB, 8 * MiB)])
    image = images.convert(raw, http_server.root / f"disk.{fmt}", fmt)
    os.truncate(image, image.stat().st_size // 2)
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(image.name),
                               IMPORTER_IMAGE_SIZE=str(64 * MiB))
    url, length = http_server.url(image.name), image.stat().st_size
    assert result.code == 1
    if fmt in ("vpc", "vhdx"):  # qemu-img itself refuses to open them
        assert result.message.startswith(
            f"Unable to process data: image {url} is invalid: qemu-img: ")
        assert "truncated" in result.message
    else:
        head, _, tail = result.message.partition(" is invalid because it is truncated: ")
        assert head == f"Unable to process data: Image {url}"
        m = re.fullmatch(r"its data reaches byte (\d+) but the file ends at byte (\d+)", tail)
        assert m is not None, tail
        reaches, ends = int(m[1]), int(m[2])
        assert ends == length and reaches > length
    assert not vol.disk.exists()


def test_truncated_upload_is_refused(tmp_path: Path, volume: Callable[..., Volume],
                                     upload_server: UploadServer) -> None:
    raw = images.make_raw(tmp_path / "disk.raw", virtual_size=32 * MiB,
                          extents=[(0, 4 * MiB), (24 * MiB, 8 * MiB)])
    image = images.convert(raw, tmp_path / "disk.qcow2", "qcow2")
    os.truncate(image, image.stat().st_size // 2)
    vol = volume()
    url = upload_server(vol)
    with image.open("rb") as body:
        answer = requests.post(f"{url}/v1beta1/upload", data=body, timeout=60)
    assert answer.status_code == 400
    assert answer.text.startswith(f"Saving stream failed: Image {vol.scratch_dir / 'tmpimage'} "
                                  "is invalid because it is truncated: its data reaches byte ")
    assert answer.text.endswith(f" but the file ends at byte {image.stat().st_size}")
    assert not vol.disk.exists()
    assert list(vol.scratch_dir.iterdir()) == []
