"""The sparse writer and the volume's usable space."""

from __future__ import annotations

import mmap
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


def _cached(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.parametrize("block", [False, True])
def test_write_data_direct(tmp_path: Path, block: bool) -> None:
    """write_data: aligned pieces of page-aligned buffers go past the page cache (O_DIRECT),
    unaligned ones and read-only buffers take the cache; gaps stay holes; content exact."""
    path = tmp_path / "t"
    if block:
        path.write_bytes(b"\xee" * (16 * MiB))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # count only what we write
        os.close(fd)
        assert _cached(path) == 0
    rnd = random.Random(5)
    aligned = mmap.mmap(-1, 4 * MiB)
    aligned.write(rnd.randbytes(4 * MiB))
    odd = rnd.randbytes(10_000)  # read-only bytes, odd length
    expected = bytearray(12 * MiB)
    with target.Writer.open(path, block=block, capacity=16 * MiB, preallocate=False,
                            direct=True) as w:
        w.offset = MiB  # a hole before
        with memoryview(aligned) as view:
            w.write_data(view[: 4 * MiB])  # aligned: direct
            expected[MiB : 5 * MiB] = aligned[: 4 * MiB]
            w.offset = 6 * MiB + 512  # unaligned start: buffered
            w.write_data(view[: 2 * MiB])
            expected[6 * MiB + 512 : 8 * MiB + 512] = aligned[: 2 * MiB]
            w.offset = 9 * MiB  # aligned start, length not a block multiple: both ways
            w.write_data(view[: MiB + 100])
            expected[9 * MiB : 10 * MiB + 100] = aligned[: MiB + 100]
        w.write_data(memoryview(odd))  # read-only: buffered
        expected[10 * MiB + 100 : 10 * MiB + 100 + len(odd)] = odd
        w.offset = 12 * MiB
        with pytest.raises(errors.ImageTooLarge):
            w.write_data(memoryview(bytes(5 * MiB)), total=17 * MiB)
        assert w.finish() == 12 * MiB
        data = w.data_bytes
        cached = _cached(path)
    content = path.read_bytes()
    assert content[: 12 * MiB] == expected
    if block:
        assert content[12 * MiB :] == b"\xee" * (4 * MiB), "beyond the image: untouched"
        assert content[: MiB] == bytes(MiB), "the hole before the data was discarded"
    else:
        assert path.stat().st_size == 12 * MiB
    assert data == 4 * MiB + 2 * MiB + MiB + 100 + len(odd)
    # Only the buffered pieces (2 MiB + a block + 10 KB, page-rounded) went through the cache.
    assert cached <= 2 * MiB + 3 * 4 * KiB + len(odd) + 8 * KiB, cached
    if not block:
        assert images.allocated_bytes(path) <= data + 64 * KiB, "holes stay holes"


def test_write_data_without_direct_io(tmp_path: Path) -> None:
    """On a file system that refuses O_DIRECT (tmpfs on older kernels) the writer falls back
    to buffered writes; here O_DIRECT is not asked for, and the result is the same."""
    path = tmp_path / "t"
    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    with target.Writer.open(path, block=False, capacity=4 * MiB, preallocate=False) as w:
        with memoryview(buf) as view:
            w.write_data(view)
        w.finish()
        assert _cached(path) == MiB  # through the page cache
    assert path.read_bytes() == buf[:]
