"""The only place that runs qemu-img.

Images come from untrusted sources, so every call here is defensive: ``info``
always names the format (so a raw image cannot pose as qcow2 and pull in a
backing file), runs under a wall-clock timeout and under CPU and address-space
limits (a malformed header that claims a giant L1 table fails instead of eating
the machine), and ``convert`` opens qcow2/vmdk sources with ``backing: null`` so
even an image that changes between ``info`` and ``convert`` cannot make
qemu-img open a file we did not choose.  Only argv lists are used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from importer import errors

log = logging.getLogger(__name__)

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
PRLIMIT = os.environ.get("PRLIMIT", "prlimit")

INFO_TIMEOUT = 30  # seconds of wall-clock time for `info`
INFO_ADDRESS_SPACE = 1 << 30  # bytes; the limits OpenStack Nova and CDI used
INFO_CPU_SECONDS = 30

# Formats we hand to qemu-img; "vpc" is qemu's name for VHD.
ALLOWED_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
_BACKING_FORMATS = ("qcow2", "vmdk")  # formats whose open options accept "backing"
_MAPPED_FORMATS = ("qcow2", "vmdk", "vdi", "vpc", "vhdx")  # data at offsets of the file

MAP_TIMEOUT = 120  # seconds of wall-clock time for `map` (it walks every table)
MAP_CPU_SECONDS = 60
TRUNCATION_SLACK = 64 * 1024
"""Data may end this far past the end of the file (less than a cluster) and still pass."""

# `convert` preallocation methods, tried in order while qemu-img says
# "Unsupported preallocation mode".
PREALLOCATION_METHODS: tuple[tuple[str, ...], ...] = (
    ("-o", "preallocation=falloc"),
    ("-o", "preallocation=full"),
    ("-S", "0"),
)
_PROGRESS = re.compile(rb"\((\d?\d\d?\.\d\d)/100%\)")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    data_file: str | None


def info(url: str, *, fmt: str) -> ImageInfo:
    """`qemu-img info --output=json -f FMT URL` under time and resource limits."""
    cmd = [
        PRLIMIT,
        f"--as={INFO_ADDRESS_SPACE}",
        f"--cpu={INFO_CPU_SECONDS}",
        "--",
        QEMU_IMG,
        "info",
        "--output=json",
        "-f",
        fmt,
        url,
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=INFO_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise errors.InvalidImage(
            image=url, reason=f"qemu-img info did not finish within {INFO_TIMEOUT} s"
        ) from e
    if p.returncode != 0:
        raise errors.InvalidImage(image=url, reason=_stderr(p.stderr))
    data: dict[str, Any] = json.loads(p.stdout)
    specific = data.get("format-specific", {}).get("data", {})
    return ImageInfo(
        format=data["format"],
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
        data_file=specific.get("data-file"),
    )


def validate(image: ImageInfo, *, url: str, available: int) -> None:
    """CDI's checks before conversion: allowed format, no backing or data file, fits."""
    if image.format not in ALLOWED_FORMATS:
        raise errors.UnsupportedFormat(format=image.format, image=url)
    if image.backing_file:
        raise errors.InvalidBackingFile(image=url, backing=image.backing_file)
    if image.data_file:
        raise errors.InvalidDataFile(image=url, data_file=image.data_file)
    if image.virtual_size > available:
        raise errors.ImageTooLarge(virtual=image.virtual_size, available=available)


def check_complete(url: str, *, fmt: str) -> None:
    """Refuse an image whose data lies past the end of its file: it was cut short.

    qemu-img reads what lies past the end of a file as zeros, so a qcow2,
    VMDK or VDI that lost its tail (a download that stopped, half a copy)
    converts without a word into a disk with holes where data was.  ``map``
    gives where each run of data lives in the file; a run that ends past the
    file's length (``info -f raw`` of the same URL: a file, or an NBD export
    of an HTTP source) by ``TRUNCATION_SLACK`` or more means the file is
    incomplete.  Compressed clusters have no plain offset and are skipped.
    """
    if fmt not in _MAPPED_FORMATS:
        return
    length = info(url, fmt="raw").virtual_size
    cmd = [PRLIMIT, f"--as={INFO_ADDRESS_SPACE}", f"--cpu={MAP_CPU_SECONDS}", "--",
           QEMU_IMG, "map", "--output=json", source_spec(url, fmt)]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=MAP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise errors.InvalidImage(
            image=url, reason=f"qemu-img map did not finish within {MAP_TIMEOUT} s") from e
    if p.returncode != 0:
        raise errors.InvalidImage(image=url, reason=_stderr(p.stderr))
    end = 0
    for extent in json.loads(p.stdout):
        if extent.get("data") and "offset" in extent and not extent.get("compressed"):
            end = max(end, int(extent["offset"]) + int(extent["length"]))
    if end >= length + TRUNCATION_SLACK:
        raise errors.TruncatedImage(image=url, end=end, length=length)


def source_spec(url: str, fmt: str) -> str:
    """A `json:` pseudo-filename that opens URL as FMT and never opens a backing file."""
    if url.startswith("nbd+unix://"):
        socket = url.split("socket=", 1)[1]
        file: dict[str, Any] = {"driver": "nbd", "server": {"type": "unix", "path": socket}}
    else:
        file = {"driver": "file", "filename": url}
    spec: dict[str, Any] = {"driver": fmt, "file": file}
    if fmt in _BACKING_FORMATS:
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def convert(
    src: str,
    dst: Path,
    *,
    src_format: str,
    preallocation: bool = False,
    target_exists: bool = False,
    cache: str = "writeback",
    progress: Callable[[float], None] | None = None,
) -> None:
    """`qemu-img convert -p -O raw` SRC into DST, removing DST if it fails.

    ``target_exists`` is for block targets (a device, or a file standing in for
    one, whose size must not change): qemu-img writes into it with ``-n``.
    """
    base = [QEMU_IMG, "convert", "-p", "-t", cache, "-O", "raw"]
    methods: tuple[tuple[str, ...], ...] = ((),)
    if preallocation:
        methods = (("-S", "0"),) if target_exists else PREALLOCATION_METHODS
    tail = (["-n"] if target_exists else []) + [source_spec(src, src_format), str(dst)]
    for i, method in enumerate(methods):
        cmd = base + list(method) + tail
        try:
            _run_with_progress(cmd, progress)
            return
        except errors.QemuImgError as e:
            last = i == len(methods) - 1
            if not last and "Unsupported preallocation mode" in e.stderr:
                log.info("PREALLOCATION method=%s unsupported, trying next", " ".join(method))
                continue
            if not target_exists:
                dst.unlink(missing_ok=True)
            raise


def resize(path: Path, size: int, *, preallocation: bool = False) -> None:
    """Grow a raw image to SIZE bytes; never shrink it."""
    current = path.stat().st_size
    if size <= current:
        return
    methods = ["--preallocation=falloc", "--preallocation=full"] if preallocation else [""]
    for i, method in enumerate(methods):
        cmd = [QEMU_IMG, "resize", "-f", "raw", *([method] if method else []), str(path), str(size)]
        try:
            _run(cmd)
            return
        except errors.QemuImgError as e:
            if i < len(methods) - 1 and "Unsupported preallocation mode" in e.stderr:
                continue
            raise


def create(path: Path, size: int, *, preallocation: bool = False) -> None:
    """`qemu-img create -f raw` (blank disks)."""
    opts = ["-o", "preallocation=falloc"] if preallocation else []
    _run([QEMU_IMG, "create", "-f", "raw", *opts, str(path), str(size)])


def compare(a: str, b: str, *, fmt_a: str = "raw", fmt_b: str = "raw") -> bool:
    """True if the two images have the same content (`qemu-img compare`)."""
    p = subprocess.run(
        [QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, a, b], capture_output=True, check=False
    )
    if p.returncode == 0:
        return True
    if p.returncode == 1:
        return False
    raise errors.QemuImgError(command="qemu-img compare", rc=p.returncode, stderr=_stderr(p.stderr))


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, check=False)
    if p.returncode != 0:
        raise errors.QemuImgError(
            command=f"qemu-img {cmd[1]}", rc=p.returncode, stderr=_stderr(p.stderr)
        )


def _run_with_progress(cmd: list[str], progress: Callable[[float], None] | None) -> None:
    log.info("RUN %s", " ".join(cmd))
    with tempfile.TemporaryFile() as err:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err) as p:
            assert p.stdout is not None
            try:
                pending = b""
                while chunk := p.stdout.read1(4096):  # type: ignore[attr-defined]
                    pending += chunk
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for line in lines:
                        m = _PROGRESS.search(line)
                        if m and progress is not None:
                            progress(float(m.group(1)))
                rc = p.wait()
            finally:
                if p.poll() is None:  # interrupted: never leave qemu-img writing behind us
                    p.kill()
        err.seek(0)
        stderr = err.read()
    if rc != 0:
        raise errors.QemuImgError(command=f"qemu-img {cmd[1]}", rc=rc, stderr=_stderr(stderr))


def _stderr(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text[-1024:]
