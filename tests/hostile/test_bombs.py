"""Compressed images that grow far past their volume: refused with CDI's capacity error.

A gzip or xz stream of 1 GiB of zeros is about a megabyte on the wire; the
volume asked for is 64 MiB.  The real worker imports it over real HTTP and
must stop with CDI's capacity error and leave nothing behind, in the volume
or in scratch space.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.importer.conftest import Importer, Volume
from tests.support.httpserver import FileServer

MiB = 1 << 20
BOMB = 1024 * MiB
VOLUME = 64 * MiB


def _bomb(path: Path, algo: str) -> Path:
    zeros = bytes(MiB)
    if algo == "gz":
        z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        with path.open("wb") as f:
            for _ in range(BOMB // MiB):
                f.write(z.compress(zeros))
            f.write(z.flush())
    else:
        x = lzma.LZMACompressor(preset=0)
        with path.open("wb") as f:
            for _ in range(BOMB // MiB):
                f.write(x.compress(zeros))
            f.write(x.flush())
    return path


@pytest.mark.parametrize("algo", ["gz", "xz"])
def test_decompression_bomb_is_refused(algo: str, http_server: FileServer,
                                       volume: Callable[..., Volume],
                                       import_in_process: Importer) -> None:
    bomb = _bomb(http_server.root / f"bomb.raw.{algo}", algo)
    assert bomb.stat().st_size < 2 * MiB
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(bomb.name),
                               IMPORTER_IMAGE_SIZE=str(VOLUME))
    assert (result.code, result.message) == (
        1, f"Unable to process data: image size (more than {VOLUME} bytes) is larger than the "
           f"reported available storage {VOLUME}. A larger PVC is required")
    assert not vol.disk.exists()
    assert list(vol.scratch_dir.iterdir()) == []
