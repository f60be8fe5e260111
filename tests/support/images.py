"""Deterministic disk images for importer tests, built with the real qemu-img.

Everything here writes files and returns their paths. External tools are run with
argv lists (never a shell) and ``check=True``; their stderr is captured so that a
failure shows up in the :class:`subprocess.CalledProcessError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

STANDARD_VIRTUAL_SIZE = 64 * MiB
STANDARD_EXTENTS: list[tuple[int, int]] = [
    (0, 1 * MiB),
    (10 * MiB, 3 * MiB),
    (40 * MiB, 2 * MiB),
    (63 * MiB, 1 * MiB),
]
STANDARD_DATA_BYTES = sum(length for _, length in STANDARD_EXTENTS)  # 7 MiB

FORMATS = ("qcow2", "vmdk", "vdi", "vpc", "vhdx")
DEFAULT_OPTIONS: dict[str, list[str]] = {
    # Without force_size, qemu-img rounds a VHD up to a CHS geometry
    # (64 MiB -> 67125248 bytes, 16 KiB more).
    "vpc": ["subformat=dynamic", "force_size=on"],
}
COMPRESSORS: dict[str, list[str]] = {
    "gz": ["gzip", "-c", "-n"],
    "xz": ["xz", "-c", "-T1"],
    "zst": ["zstd", "-q", "-c"],
    "bz2": ["bzip2", "-c"],
}

# qcow2_with_backing(): what the overlay writes on top of the base, (offset, length, byte).
OVERLAY_WRITES: list[tuple[int, int, int]] = [
    (10 * MiB + 512 * KiB, 512 * KiB, 0xAB),  # over data of the base
    (20 * MiB, 1 * MiB, 0xCD),  # over a hole of the base
]

HUGE_L1_VIRTUAL_SIZE = 2**50
HUGE_L1_SIZE = 0x2000000  # entries; qemu's limit is 32 MiB of table = 0x400000 entries
HUGE_L1_ERROR = "Active L1 table too large"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, capture_output=True, cwd=cwd)


# --- raw images ---------------------------------------------------------------------


def make_raw(
    path: Path, *, virtual_size: int, extents: list[tuple[int, int]], seed: int = 0
) -> Path:
    """Write a sparse raw image of ``virtual_size`` bytes.

    Each ``(offset, length)`` extent, in list order, gets bytes from
    ``random.Random(seed).randbytes`` drawn 1 MiB at a time; the rest of the file is
    never written (a hole, reading as zeros).
    """
    for offset, length in extents:
        if offset < 0 or length < 0 or offset + length > virtual_size:
            raise ValueError(f"extent {(offset, length)} outside {virtual_size} bytes")
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(virtual_size)
        for offset, length in extents:
            f.seek(offset)
            remaining = length
            while remaining:
                piece = min(MiB, remaining)
                f.write(rng.randbytes(piece))
                remaining -= piece
    return path


def standard_raw(directory: Path) -> Path:
    """``<directory>/standard.raw``: 64 MiB virtual, 7 MiB of data in
    :data:`STANDARD_EXTENTS` (at 0, 10, 40 and 63 MiB), seed 0."""
    return make_raw(
        directory / "standard.raw",
        virtual_size=STANDARD_VIRTUAL_SIZE,
        extents=STANDARD_EXTENTS,
    )


def make_iso_like(path: Path, size: int, seed: int = 0) -> Path:
    """A raw file of ``size`` bytes of pseudo-random data carrying an ISO 9660 primary
    volume descriptor header (``\\x01CD001\\x01``) at 0x8000, i.e. ``CD001`` at 0x8001.
    Importers must treat it as raw."""
    if size < 0x8000 + 2 * KiB:
        raise ValueError("an ISO needs at least 0x8800 bytes")
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            piece = min(MiB, remaining)
            f.write(rng.randbytes(piece))
            remaining -= piece
        f.seek(0x8000)
        f.write(b"\x01CD001\x01")
    return path


# --- qemu-img formats ---------------------------------------------------------------


def convert(
    src_raw: Path,
    dst: Path,
    fmt: str,
    options: list[str] | None = None,
    *,
    compressed: bool = False,
) -> Path:
    """``qemu-img convert -f raw -O <fmt> [-c] [-o opt,...] src_raw dst``.

    ``options`` defaults to :data:`DEFAULT_OPTIONS` for the format. The virtual size
    is preserved exactly for qcow2, vmdk, vdi, vhdx and, thanks to
    ``subformat=dynamic,force_size=on``, vpc. (qemu-img 7.2 without ``force_size``
    rounds a VHD up to its CHS geometry: 64 MiB becomes 67125248 bytes. A
    ``subformat=fixed`` VHD is plain data plus a 512-byte footer and is *probed as
    raw*, with a virtual size 512 bytes larger than the file's data.)
    ``compressed`` adds ``-c`` (compressed clusters, qcow2 and vmdk streamOptimized).
    """
    opts = DEFAULT_OPTIONS.get(fmt, []) if options is None else options
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if compressed:
        argv.append("-c")
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [str(src_raw), str(dst)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    _run(argv)
    return dst


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` (probing the format unless ``fmt`` is given)."""
    argv = ["qemu-img", "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", fmt]
    argv.append(str(path))
    info: dict[str, Any] = json.loads(_run(argv).stdout)
    return info


def qcow2_with_backing(directory: Path) -> tuple[Path, Path]:
    """``(overlay, base)``: ``base.qcow2`` holds :func:`standard_raw`'s content;
    ``overlay.qcow2`` was made by ``qemu-img create -f qcow2 -b base.qcow2 -F qcow2``
    (relative backing name) and then had :data:`OVERLAY_WRITES` written into it with
    qemu-io. :func:`expected_overlay_raw` writes the flattened content."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        convert(standard_raw(Path(tmp)), directory / "base.qcow2", "qcow2")
    base = directory / "base.qcow2"
    overlay = directory / "overlay.qcow2"
    _run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay.name],
        cwd=directory,
    )
    argv = ["qemu-io", "-f", "qcow2"]
    for offset, length, byte in OVERLAY_WRITES:
        argv += ["-c", f"write -P {byte:#x} {offset} {length}"]
    argv.append(overlay.name)
    _run(argv, cwd=directory)
    return overlay, base


def expected_overlay_raw(path: Path) -> Path:
    """Write, without qemu, the raw image that :func:`qcow2_with_backing`'s overlay
    flattens to: :func:`standard_raw`'s content with :data:`OVERLAY_WRITES` applied."""
    raw = make_raw(path, virtual_size=STANDARD_VIRTUAL_SIZE, extents=STANDARD_EXTENTS)
    with open(raw, "r+b") as f:
        for offset, length, byte in OVERLAY_WRITES:
            f.seek(offset)
            f.write(bytes([byte]) * length)
    return raw


def qcow2_with_backing_url(
    directory: Path, backing_url: str, virtual_size: int = STANDARD_VIRTUAL_SIZE
) -> Path:
    """``<directory>/overlay-url.qcow2``, an empty qcow2 overlay whose backing file
    name is ``backing_url`` (format raw), created with ``-u`` so nothing is fetched."""
    directory.mkdir(parents=True, exist_ok=True)
    overlay = directory / "overlay-url.qcow2"
    _run(
        [
            "qemu-img", "create", "-q", "-f", "qcow2", "-u",
            "-b", backing_url, "-F", "raw",
            str(overlay), str(virtual_size),
        ]
    )  # fmt: skip
    return overlay


def qcow2_huge_l1(path: Path) -> Path:
    """A small (~200 KiB) malformed qcow2 in the spirit of KubeVirt CDI's
    ``invalid-qcow-large-memory.img``.

    Made from ``qemu-img create -f qcow2 <path> 1M`` by patching the big-endian header:
    ``size`` (offset 24, u64) := 2**50 and ``l1_size`` (offset 36, u32) := 0x2000000
    entries (256 MiB of L1 table, past qemu's 32 MiB limit; ``l1_table_offset`` is left
    alone). qemu-img 7.2 rejects it at once; ``qemu-img info -f qcow2 <path>`` exits 1
    with this exact stderr::

        qemu-img: Could not open '<path>': Active L1 table too large

    (:data:`HUGE_L1_ERROR` is the path-independent part). With an ``l1_size`` inside
    the limit but too small for the size, the message is ``L1 table is too small``
    instead; with one inside the limit and big enough, qemu-img 7.2 opens it fine.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"])
    with open(path, "r+b") as f:
        header = f.read(48)
        if header[:4] != b"QFI\xfb":
            raise RuntimeError(f"{path} is not a qcow2 image")
        f.seek(24)
        f.write(struct.pack(">Q", HUGE_L1_VIRTUAL_SIZE))
        f.seek(36)
        f.write(struct.pack(">I", HUGE_L1_SIZE))
    return path


# --- compression --------------------------------------------------------------------


def compress(src: Path, algo: str) -> Path:
    """Compress ``src`` with the command-line tool for ``algo`` (gz, xz, zst, bz2) into
    ``<src>.<algo>``; ``src`` is kept."""
    try:
        argv = COMPRESSORS[algo]
    except KeyError:
        raise ValueError(f"unknown compression {algo!r}") from None
    dst = src.with_name(f"{src.name}.{algo}")
    with open(dst, "wb") as out:
        subprocess.run([*argv, str(src)], check=True, stdout=out, stderr=subprocess.PIPE)
    return dst


# --- tar archives -------------------------------------------------------------------

_TAR_MTIME = 1_700_000_000
HOSTILE_KINDS = ("absolute", "dotdot", "symlink_escape", "hardlink_escape", "device")


def _tar_target(dest: Path, default_name: str) -> Path:
    return dest / default_name if dest.is_dir() else dest


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = _TAR_MTIME
    tar.addfile(info, io.BytesIO(data))


def make_tar(dest: Path, members: dict[str, bytes]) -> Path:
    """A plain tar of regular files (``name -> content``, in dict order). ``dest`` is the
    archive's path, or an existing directory to write ``archive.tar`` into."""
    target = _tar_target(dest, "archive.tar")
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            _add_file(tar, name, data)
    return target


def hostile_tar(dest: Path, kind: str, extra: dict[str, bytes] | None = None) -> Path:
    """A tar that a safe extractor must refuse. ``dest`` is the archive's path, or an
    existing directory to write ``hostile-<kind>.tar`` into. ``extra`` regular files
    (e.g. a small disk image) come first. Kinds:

    * ``absolute``: regular file ``/etc/evil``
    * ``dotdot``: regular file ``../evil``
    * ``symlink_escape``: symlink ``link -> /etc``, then regular file ``link/evil``
    * ``hardlink_escape``: hard link ``evil`` to ``/etc/passwd``
    * ``device``: character device ``evil`` (1, 3), like /dev/null
    """
    if kind not in HOSTILE_KINDS:
        raise ValueError(f"unknown hostile tar kind {kind!r}")
    target = _tar_target(dest, f"hostile-{kind}.tar")
    with tarfile.open(target, "w") as tar:
        for name, data in (extra or {}).items():
            _add_file(tar, name, data)
        if kind == "absolute":
            _add_file(tar, "/etc/evil", b"pwned\n")
        elif kind == "dotdot":
            _add_file(tar, "../evil", b"pwned\n")
        elif kind == "symlink_escape":
            link = tarfile.TarInfo("link")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc"
            link.mode = 0o777
            link.mtime = _TAR_MTIME
            tar.addfile(link)
            _add_file(tar, "link/evil", b"pwned\n")
        elif kind == "hardlink_escape":
            hard = tarfile.TarInfo("evil")
            hard.type = tarfile.LNKTYPE
            hard.linkname = "/etc/passwd"
            hard.mode = 0o644
            hard.mtime = _TAR_MTIME
            tar.addfile(hard)
        else:  # device
            dev = tarfile.TarInfo("evil")
            dev.type = tarfile.CHRTYPE
            dev.devmajor = 1
            dev.devminor = 3
            dev.mode = 0o666
            dev.mtime = _TAR_MTIME
            tar.addfile(dev)
    return target


# --- inspection ---------------------------------------------------------------------


def allocated_bytes(path: Path) -> int:
    """Bytes the file occupies on disk (``st_blocks * 512``)."""
    return os.stat(path).st_blocks * 512


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_of_raw(path: Path, fmt: str | None = None) -> str:
    """SHA-256 of the image's guest-visible (raw) content.

    ``fmt`` is probed with ``qemu-img info`` when not given. Raw files are hashed as
    they are; anything else (backing chains included) is first converted to a
    temporary raw file next to ``path``.
    """
    fmt = fmt if fmt is not None else str(image_info(path)["format"])
    if fmt == "raw":
        return _sha256_file(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "flat.raw"
        _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)])
        return _sha256_file(raw)
