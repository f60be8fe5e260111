"""The sparse writer and the volume's usable space."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from importer import errors, settings, target
from tests.support import images

MiB = 1 << 20
KiB = 1 << 10


def _chunks() -> list[bytes]:
    rnd = random.Random(3)
    return [
        rnd.randbytes(100 * KiB),          # data
        bytes(3 * MiB),                    # a long hole
        bytes(64 * KiB) + rnd.randbytes(1000) + bytes(200 * KiB),  # mostly zeros
        rnd.randbytes(MiB),
        bytes(2 * MiB),                    # trailing zeros
    ]


def _write_all(w: target.Writer, chunks: list[bytes]) -> int:
    for c in chunks:
        buf = bytearray(c) + bytearray(16)  # the writer must use only `length` bytes
        w.write(buf, len(c))
    return w.finish()


@pytest.mark.parametrize("block", [False, True])
def test_sparse_write(tmp_path: Path, block: bool) -> None:
    path = tmp_path / "t"
    if block:
        with path.open("wb") as f:  # old contents must not survive
            f.write(b"\xee" * (8 * MiB))
    chunks = _chunks()
    expected = b"".join(chunks)
    with target.Writer.open(path, block=block, capacity=8 * MiB, preallocate=False) as w:
        size = _write_all(w, chunks)
        data = w.data_bytes
    assert size == len(expected)
    content = path.read_bytes()
    assert content[: len(expected)] == expected
    assert path.stat().st_size == (8 * MiB if block else len(expected))
    if block:
        assert content[len(expected):] == b"\xee" * (8 * MiB - len(expected))
    # Only the data segments were written (64 KiB granularity).
    assert data <= 100 * KiB + 64 * KiB + MiB + 64 * KiB
    allocated = images.allocated_bytes(path) - (8 * MiB - len(expected) if block else 0)
    assert allocated <= data + 64 * KiB


def test_preallocated_write(tmp_path: Path) -> None:
    path = tmp_path / "t"
    chunks = _chunks()
    with target.Writer.open(path, block=False, capacity=8 * MiB, preallocate=True) as w:
        size = _write_all(w, chunks)
    assert path.read_bytes() == b"".join(chunks)
    assert images.allocated_bytes(path) >= size


def test_capacity(tmp_path: Path) -> None:
    with target.Writer.open(tmp_path / "t", block=False, capacity=MiB, preallocate=False) as w:
        w.write(bytearray(MiB), MiB)
        with pytest.raises(errors.StreamTooLarge):
            w.write(bytearray(1), 1)
        with pytest.raises(errors.ImageTooLarge, match="virtual image size 5 is larger"):
            w.write(bytearray(1), 1, total=5)


@pytest.mark.parametrize("block", [False, True])
def test_reset(tmp_path: Path, block: bool) -> None:
    path = tmp_path / "t"
    if block:
        with path.open("wb") as f:
            f.truncate(4 * MiB)
    with target.Writer.open(path, block=block, capacity=4 * MiB, preallocate=False) as w:
        w.write(bytearray(b"\x01" * MiB), MiB)
        w.reset()
        w.write(bytearray(b"\x02" * 1000), 1000)
        w.finish()
    content = path.read_bytes()
    assert content[:1000] == b"\x02" * 1000
    assert content[1000:] == bytes(len(content) - 1000)


def test_no_space_left(tmp_path: Path) -> None:
    with target.Writer.open(Path("/dev/full"), block=True, capacity=MiB,
                            preallocate=False) as w:
        with pytest.raises(errors.ProcessingError, match="no space left on device"):
            w.write(bytearray(b"\x01" * 4096), 4096)


def test_usable_space_from_settings(tmp_path: Path) -> None:
    s = settings.from_env({"IMPORTER_SOURCE": "none", "IMPORTER_DATA_DIR": str(tmp_path / "d"),
                           "IMPORTER_BLOCK_PATH": str(tmp_path / "none"),
                           "IMPORTER_IMAGE_SIZE": "1Gi", "FILESYSTEM_OVERHEAD": "0.055"})
    t = target.Target.from_settings(s)
    assert (t.is_block, t.capacity, t.path) == (False, 970 * MiB, tmp_path / "d" / "disk.img")

    dev = tmp_path / "dev"
    with dev.open("wb") as f:
        f.truncate(3 * MiB + 512)
    s = settings.from_env({"IMPORTER_SOURCE": "none", "IMPORTER_BLOCK_PATH": str(dev),
                           "IMPORTER_IMAGE_SIZE": "1Gi", "FILESYSTEM_OVERHEAD": "0.055"})
    t = target.Target.from_settings(s)
    assert (t.is_block, t.capacity) == (True, 3 * MiB + 512), "a device's size, no overhead"


def test_remove_block_discards(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    with dev.open("wb") as f:
        f.write(os.urandom(2 * MiB))
    target.Target(dev, is_block=True, capacity=2 * MiB).remove()
    assert dev.read_bytes() == bytes(2 * MiB)
    assert images.allocated_bytes(dev) == 0


def test_scratch_writer_keeps_the_page_cache(tmp_path: Path) -> None:
    """A scratch image is read back by qemu-img at once: its pages stay cached; a
    volume's are dropped once on disk."""
    def cached(path: Path) -> int:
        """Bytes of PATH in the page cache (fincore, from util-linux)."""
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              str(path)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    buf = bytearray(os.urandom(target.WRITEBACK_WINDOW))
    sizes = {}
    for keep in (False, True):
        path = tmp_path / f"keep-{keep}.img"
        with target.Writer.open(path, block=False, capacity=1 << 30, preallocate=False,
                                keep_cache=keep) as w:
            for _ in range(4):
                w.write(buf, len(buf))
        sizes[keep] = cached(path)
    assert sizes[True] >= 3 * target.WRITEBACK_WINDOW
    assert sizes[False] <= 2 * target.WRITEBACK_WINDOW
