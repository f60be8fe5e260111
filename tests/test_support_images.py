"""Tests of the image builders in tests/support/images.py."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import random
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backports import zstd

from tests.support import images
from tests.support.images import (
    FORMATS,
    HUGE_L1_ERROR,
    STANDARD_DATA_BYTES,
    STANDARD_EXTENTS,
    STANDARD_VIRTUAL_SIZE,
    MiB,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def standard(workdir: Path) -> Path:
    return images.standard_raw(workdir)


def qemu_compare(raw: Path, other: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(other)],
        capture_output=True,
        text=True,
        check=False,
    )


# --- raw ----------------------------------------------------------------------------


def test_standard_raw_layout(standard: Path) -> None:
    assert standard.stat().st_size == STANDARD_VIRTUAL_SIZE == 64 * MiB
    assert STANDARD_DATA_BYTES == 7 * MiB
    data = standard.read_bytes()
    rng = random.Random(0)
    hole_start = 0
    hole_bytes = 0
    for offset, length in STANDARD_EXTENTS:
        expected = b"".join(rng.randbytes(min(MiB, length - i)) for i in range(0, length, MiB))
        assert data[offset : offset + length] == expected
        assert data[hole_start:offset].count(0) == offset - hole_start
        hole_bytes += offset - hole_start
        hole_start = offset + length
    assert data[hole_start:].count(0) == len(data) - hole_start
    hole_bytes += len(data) - hole_start
    assert hole_bytes == 57 * MiB
    # Sparse on disk: about the 7 MiB of data, far less than 64 MiB.
    assert 7 * MiB <= images.allocated_bytes(standard) < 16 * MiB


def test_make_raw_is_deterministic_per_seed(tmp_path: Path) -> None:
    extents = [(4096, 3 * MiB + 5)]
    a = images.make_raw(tmp_path / "a", virtual_size=8 * MiB, extents=extents, seed=3)
    b = images.make_raw(tmp_path / "b", virtual_size=8 * MiB, extents=extents, seed=3)
    c = images.make_raw(tmp_path / "c", virtual_size=8 * MiB, extents=extents, seed=4)
    assert images.sha256_of_raw(a) == images.sha256_of_raw(b) != images.sha256_of_raw(c)
    assert images.sha256_of_raw(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="outside"):
        images.make_raw(tmp_path / "d", virtual_size=MiB, extents=[(MiB - 1, 2)])


def test_iso_like_is_raw_with_signature(tmp_path: Path) -> None:
    iso = images.make_iso_like(tmp_path / "x.iso", 3 * MiB)
    data = iso.read_bytes()
    assert len(data) == 3 * MiB
    assert data[0x8001:0x8006] == b"CD001"
    assert data[0x8000] == 1
    assert data[:0x8000].count(0) < 0x8000 // 64  # random, not a hole
    info = images.image_info(iso)
    assert (info["format"], info["virtual-size"]) == ("raw", 3 * MiB)


# --- qemu formats -------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(workdir: Path, standard: Path) -> dict[str, Path]:
    return {fmt: images.convert(standard, workdir / f"standard.{fmt}", fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_preserves_content_and_size(
    standard: Path, converted: dict[str, Path], fmt: str
) -> None:
    image = converted[fmt]
    info = images.image_info(image)  # probed, not told
    assert info["format"] == fmt
    assert info["virtual-size"] == STANDARD_VIRTUAL_SIZE
    result = qemu_compare(standard, image, fmt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout
    assert images.allocated_bytes(image) < 32 * MiB  # holes stayed holes
    assert images.sha256_of_raw(image) == images.sha256_of_raw(standard)


def test_compare_detects_a_difference(tmp_path: Path, converted: dict[str, Path]) -> None:
    other = images.make_raw(
        tmp_path / "other.raw", virtual_size=STANDARD_VIRTUAL_SIZE, extents=STANDARD_EXTENTS, seed=1
    )
    assert qemu_compare(other, converted["qcow2"], "qcow2").returncode == 1
    assert images.sha256_of_raw(converted["qcow2"]) != images.sha256_of_raw(other)


def test_vpc_without_force_size_rounds_up(tmp_path: Path, standard: Path) -> None:
    vhd = images.convert(standard, tmp_path / "chs.vhd", "vpc", ["subformat=dynamic"])
    assert images.image_info(vhd)["virtual-size"] == 67125248


def test_compressed_qcow2(tmp_path: Path, standard: Path) -> None:
    image = images.convert(standard, tmp_path / "c.qcow2", "qcow2", compressed=True)
    assert qemu_compare(standard, image, "qcow2").returncode == 0
    assert image.stat().st_size < 7 * MiB + MiB  # random data hardly compresses


def test_qcow2_with_backing(tmp_path: Path) -> None:
    overlay, base = images.qcow2_with_backing(tmp_path / "chain")
    assert (overlay.name, base.name) == ("overlay.qcow2", "base.qcow2")
    info = images.image_info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == STANDARD_VIRTUAL_SIZE
    assert "backing-filename" not in images.image_info(base)
    # The overlay really holds only its writes (~1.5 MiB), not the base's 7 MiB.
    assert images.allocated_bytes(overlay) < 4 * MiB
    expected = images.expected_overlay_raw(tmp_path / "expected.raw")
    result = qemu_compare(expected, overlay, "qcow2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert qemu_compare(images.standard_raw(tmp_path), base, "qcow2").returncode == 0
    assert qemu_compare(images.standard_raw(tmp_path), overlay, "qcow2").returncode == 1


def test_qcow2_with_backing_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/images/base.raw"
    overlay = images.qcow2_with_backing_url(tmp_path, url, virtual_size=32 * MiB)
    info = images.image_info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == url
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 32 * MiB


def test_qcow2_huge_l1_fails_qemu_img_info(tmp_path: Path) -> None:
    image = images.qcow2_huge_l1(tmp_path / "huge.qcow2")
    assert image.stat().st_size < MiB
    header = image.read_bytes()[:48]
    assert header[:4] == b"QFI\xfb"
    assert int.from_bytes(header[24:32], "big") == 2**50
    assert int.from_bytes(header[36:40], "big") == 0x2000000
    for fmt_args in (["-f", "qcow2"], []):
        result = subprocess.run(
            ["qemu-img", "info", *fmt_args, str(image)],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
        assert result.returncode == 1
        assert result.stderr == f"qemu-img: Could not open '{image}': {HUGE_L1_ERROR}\n"


# --- compression --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_raw(workdir: Path) -> Path:
    return images.make_raw(
        workdir / "small.raw", virtual_size=4 * MiB, extents=[(MiB, 256 * 1024)], seed=5
    )


def zstd_decompress(data: bytes) -> bytes:
    # decompressobj() copes with frames that do not record the content size.
    out: bytes = zstd.decompress(data)
    return out


DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gz": gzip.decompress,
    "xz": lzma.decompress,
    "bz2": bz2.decompress,
    "zst": zstd_decompress,
}
MAGICS = {"gz": b"\x1f\x8b", "xz": b"\xfd7zXZ\x00", "bz2": b"BZh", "zst": b"\x28\xb5\x2f\xfd"}


@pytest.mark.parametrize("algo", sorted(DECOMPRESSORS))
def test_compress_round_trips(small_raw: Path, algo: str) -> None:
    packed = images.compress(small_raw, algo)
    assert packed == small_raw.with_name(f"small.raw.{algo}")
    data = packed.read_bytes()
    assert data.startswith(MAGICS[algo])
    assert len(data) < MiB
    assert DECOMPRESSORS[algo](data) == small_raw.read_bytes()
    assert small_raw.exists()


def test_compress_rejects_unknown(small_raw: Path) -> None:
    with pytest.raises(ValueError, match="lz4"):
        images.compress(small_raw, "lz4")


# --- tar ----------------------------------------------------------------------------


def members(path: Path) -> Iterator[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        yield from tar.getmembers()


def test_make_tar(tmp_path: Path) -> None:
    path = images.make_tar(tmp_path / "a.tar", {"disk.img": b"abc", "dir/notes": b""})
    assert [(m.name, m.type, m.size) for m in members(path)] == [
        ("disk.img", tarfile.REGTYPE, 3),
        ("dir/notes", tarfile.REGTYPE, 0),
    ]
    with tarfile.open(path) as tar:
        extracted = tar.extractfile("disk.img")
        assert extracted is not None
        with extracted:
            assert extracted.read() == b"abc"
    assert images.make_tar(tmp_path, {"x": b"1"}) == tmp_path / "archive.tar"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("absolute", [("/etc/evil", tarfile.REGTYPE, "")]),
        ("dotdot", [("../evil", tarfile.REGTYPE, "")]),
        (
            "symlink_escape",
            [("link", tarfile.SYMTYPE, "/etc"), ("link/evil", tarfile.REGTYPE, "")],
        ),
        ("hardlink_escape", [("evil", tarfile.LNKTYPE, "/etc/passwd")]),
        ("device", [("evil", tarfile.CHRTYPE, "")]),
    ],
)
def test_hostile_tar(tmp_path: Path, kind: str, expected: list[tuple[str, bytes, str]]) -> None:
    path = images.hostile_tar(tmp_path, kind, extra={"disk.img": b"\0" * 512})
    assert path == tmp_path / f"hostile-{kind}.tar"
    found = list(members(path))
    assert [(m.name, m.type, m.linkname) for m in found] == [
        ("disk.img", tarfile.REGTYPE, ""),
        *expected,
    ]
    if kind == "device":
        assert (found[-1].devmajor, found[-1].devminor) == (1, 3)
    # The standard library's data filter accepts the benign member and refuses (or
    # defuses) the first hostile one.
    destination = str(tmp_path / "out")
    assert tarfile.data_filter(found[0], destination) is not None
    try:
        filtered = tarfile.data_filter(found[1], destination)
    except tarfile.FilterError:
        pass
    else:  # absolute names are made relative rather than refused
        assert filtered.name != found[1].name


def test_hostile_tar_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fifo"):
        images.hostile_tar(tmp_path / "x.tar", "fifo")
