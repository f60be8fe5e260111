"""Small pieces every transfer uses: the copy loop, checksums, and a file face.

The copy loop owns a few buffers for the whole transfer and hands the writer
(buffer, length) pairs, so no chunk is ever copied into a new ``bytes``.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from typing import Protocol

from importer import errors, units
from importer.formats import Reader
from importer.settings import Checksum

BUFFER_SIZE = 4 * units.MiB
BUFFERS = 3  # in flight between the reading and the writing thread
READER_JOIN_TIMEOUT = 5.0


class Sink(Protocol):
    """Where copy writes: a ``target.Writer``, or a wrapper around one."""

    def write(self, buf: bytearray, length: int, *, total: int | None = None) -> None: ...


def copy(src: Reader, dst: Sink, *, total: int | None = None) -> int:
    """Copy SRC to DST until EOF; returns the bytes copied.

    A reader thread fills buffers (network reads and decompression release the
    GIL) while this thread checks them for zeros and writes them, so reading and
    writing overlap as they do in ``curl | cp``.  BUFFERS buffers go round; none
    is allocated per chunk.  An error on either side ends both.
    """
    free: queue.Queue[bytearray | None] = queue.Queue()
    for _ in range(BUFFERS):
        free.put(bytearray(BUFFER_SIZE))
    full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                if buf is None:
                    return
                n = _fill(src, buf)
                full.put((buf, n) if n else None)
                if not n:
                    return
        except BaseException as e:  # handed to the writing thread, which raises it
            full.put(e)

    reader = threading.Thread(target=read, name="copy-reader", daemon=True)
    reader.start()
    done = 0
    try:
        while True:
            item = full.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            dst.write(buf, n, total=total)
            done += n
            free.put(buf)
    finally:
        stop.set()
        free.put(None)
        # A reader blocked on the network is released when the caller closes the
        # source; do not wait for it here.
        reader.join(timeout=READER_JOIN_TIMEOUT)
    return done


def _fill(src: Reader, buf: bytearray) -> int:
    """Read until BUF is full or the source ends: fewer, larger writes and zero checks."""
    n = 0
    with memoryview(buf) as view:
        while n < len(buf):
            m = src.readinto(view[n:])
            if m == 0:
                break
            n += m
    return n


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

    def update(self, data: memoryview) -> None:
        """Hash DATA as if it had been read (bytes that came before the source)."""
        self._hash.update(data)

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
