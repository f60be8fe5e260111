"""Extraction of ``archive`` content: a tar stream unpacked onto a filesystem volume.

The tar comes from an untrusted source, so each member goes through Python's
``data`` extraction filter (no ``..``, no links leaving the target, no device
nodes, no setuid bits) and absolute names are refused outright rather than
made relative.  The stream is read once, in order; nothing is buffered whole.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from importer import errors, stream
from importer.formats import Reader


def extract(reader: Reader, data_dir: Path) -> None:
    """Untar READER into DATA_DIR; a member that would escape it fails the import."""
    raw = stream.FileAdapter(reader)
    try:
        with tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.name.startswith("/"):
                    raise errors.UnsafeArchive(member=member.name, reason="absolute path")
                try:
                    tar.extract(member, data_dir, filter="data")
                except tarfile.FilterError as e:
                    raise errors.UnsafeArchive(member=member.name, reason=str(e)) from e
    except tarfile.TarError as e:
        raise errors.CorruptStream(format="tar", reason=str(e)) from e
