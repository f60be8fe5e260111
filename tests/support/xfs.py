"""Filesystems made by the tests: XFS with reflink on a loop device, and tmpfs.

The ``local-reflink`` class needs a filesystem that shares extents; the tests
make one (a sparse image file, ``mkfs.xfs -m reflink=1``, a loop mount) rather
than trusting whatever the machine's temp dir is on.  tmpfs is the opposite
case: a filesystem that certainly cannot share extents.  Both need root, as
CI has.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*argv: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")


@contextlib.contextmanager
def xfs(directory: Path, *, size: str = "2G") -> Iterator[Path]:
    """An XFS filesystem with reflink, mounted at ``directory/mnt``."""
    image, mnt = directory / "xfs.img", directory / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    _run("truncate", "-s", size, str(image))
    _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def tmpfs(directory: Path, *, size: str = "256M") -> Iterator[Path]:
    mnt = directory / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
