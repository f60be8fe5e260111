"""Small pieces every transfer uses: the copy loop, checksums, and a file face.

The copy loop owns one buffer for the whole transfer and hands the writer a
(buffer, length) pair, so no chunk is ever copied into a new ``bytes``.
"""

from __future__ import annotations

import hashlib
import io
import threading

from importer import errors, units
from importer.formats import Reader
from importer.settings import Checksum
from importer.target import Writer

BUFFER_SIZE = 4 * units.MiB


def copy(src: Reader, dst: Writer, *, total: int | None = None,
         cancel: threading.Event | None = None) -> int:
    """Copy SRC to DST until EOF; returns the bytes copied."""
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    done = 0
    try:
        while True:
            n = src.readinto(view)
            if n == 0:
                return done
            # Fill the buffer before writing: fewer, larger writes and zero checks.
            while n < len(buf):
                m = src.readinto(view[n:])
                if m == 0:
                    break
                n += m
            dst.write(buf, n, total=total)
            done += n
            if cancel is not None and cancel.is_set():
                raise errors.ProcessingError(reason="import cancelled")
    finally:
        view.release()


class Hashing:
    """Passes reads through while computing the declared checksum."""

    def __init__(self, src: Reader, checksum: Checksum) -> None:
        self._src = src
        self.checksum = checksum
        self._hash = hashlib.new(checksum.algorithm)

    def readinto(self, buf: memoryview) -> int:
        n = self._src.readinto(buf)
        if n:
            self._hash.update(buf[:n])
        return n

    def drain(self) -> None:
        """Read whatever the consumer left unread (e.g. padding after a compressed stream)."""
        buf = bytearray(units.MiB)
        with memoryview(buf) as view:
            while self.readinto(view):
                pass

    def verify(self) -> None:
        calculated = self._hash.hexdigest()
        if calculated != self.checksum.digest:
            raise errors.ChecksumMismatch(
                algorithm=self.checksum.algorithm,
                expected=self.checksum.digest,
                calculated=calculated,
            )


class FileAdapter(io.RawIOBase):
    """A read-only raw file over a Reader, for libraries that want ``read()`` (tarfile)."""

    def __init__(self, src: Reader) -> None:
        super().__init__()
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        with memoryview(buf) as view:
            return self._src.readinto(view.cast("B"))
