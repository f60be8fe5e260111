"""Every format, plain and compressed, into filesystem and block volumes.

Real qemu-img, a real HTTP server with Range support, the real worker.  Each
import is compared with its source, its allocation with the source's data, and
scratch space must be asked for exactly when the data cannot be streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from importer import qemu_img
from tests.importer.conftest import Importer, Volume
from tests.support import images
from tests.support.httpserver import FileServer

FORMATS = ["raw", "iso", "qcow2", "vmdk", "vdi", "vpc", "vhdx"]
COMPRESSIONS = ["", "gz", "xz", "zst", "bz2"]
MiB = 1 << 20
VIRTUAL = 16 * MiB
EXTENTS = [(0, MiB // 2), (5 * MiB, MiB), (VIRTUAL - MiB // 2, MiB // 2)]  # 2 MiB of data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path, Path]]:
    root = tmp_path_factory.mktemp("formats")
    raw = images.make_raw(root / "disk.raw", virtual_size=VIRTUAL, extents=EXTENTS)
    iso = images.make_iso_like(root / "disk.iso", 4 * MiB)
    for fmt in FORMATS[2:]:
        images.convert(raw, root / f"disk.{fmt}", fmt)
    names = ["disk.raw", "disk.iso"] + [f"disk.{f}" for f in FORMATS[2:]]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: images.compress(root / job[0], job[1]),
                      [(n, a) for n in names for a in COMPRESSIONS[1:]]))
    server = FileServer(root)
    server.start()
    yield server, raw, iso
    server.stop()


def _name(fmt: str, algo: str) -> str:
    base = "disk.raw" if fmt == "raw" else f"disk.{fmt}"
    return f"{base}.{algo}" if algo else base


@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
@pytest.mark.parametrize("algo", COMPRESSIONS, ids=lambda a: a or "plain")
@pytest.mark.parametrize("fmt", FORMATS)
def test_import(
    served: tuple[FileServer, Path, Path], volume: Callable[..., Volume],
    import_in_process: Importer,
    fmt: str, algo: str, block: bool,
) -> None:
    server, raw, iso = served
    source = iso if fmt == "iso" else raw
    url = server.url(_name(fmt, algo))
    needs_scratch = fmt not in ("raw", "iso") and algo != ""

    # Without scratch space: streamable data succeeds, the rest asks for scratch.
    vol = volume(block=block, scratch=False)
    result = import_in_process(vol, IMPORTER_ENDPOINT=url, IMPORTER_IMAGE_SIZE=str(32 * MiB))
    if needs_scratch:
        assert result.code == 0
        assert result.json == {"scratchSpaceRequired": True,
                               "message": "scratch space required and none found"}
        vol = volume(block=block, scratch=True)
        result = import_in_process(vol, IMPORTER_ENDPOINT=url, IMPORTER_IMAGE_SIZE=str(32 * MiB))
        assert list(vol.scratch_dir.iterdir()) == [], "scratch space is cleaned up"

    assert result.code == 0, result.message
    assert result.json == {"message": "Import Complete", "scratchSpaceRequired": False,
                           "preallocationApplied": False}
    assert qemu_img.compare(str(source), str(vol.disk))
    data = images.allocated_bytes(source)
    allocated = images.allocated_bytes(vol.disk)
    assert allocated <= data * 1.1, f"{allocated} bytes allocated for {data} bytes of data"
    assert allocated >= data * 0.9
    if block:
        assert vol.disk.stat().st_size == 32 * MiB, "a block volume keeps its size"
    else:
        assert vol.disk.stat().st_size == 32 * MiB, "grown to the usable size"
