"""The durable offset of a resumable upload, kept in a small file next to the target.

A raw (uncompressed) image is written to the volume byte for byte, so the
number of body bytes on disk is also where a new request can continue.  While
such an upload runs, the writer is fsynced about once a second and the offset
recorded (atomically: temp file, rename, directory fsync), so it survives a
dropped connection and a crash or restart of the upload server.  A client asks
for the offset and sends the rest with ``?offset=N``.  Nothing is recorded for
compressed or convertible images: their bytes on disk are not the bytes sent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from importer import stream, target, units
from importer.formats import Reader
from importer.settings import Checksum

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0  # seconds between fsyncs of a resumable upload
VERSION = 1


class Tracker:
    """The state file of one target: the durable offset, or none (0)."""

    def __init__(self, path: Path | None, target_path: Path) -> None:
        self.path = path  # None: resuming is not possible (block volume without scratch)
        self.target_path = target_path
        self.offset = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @classmethod
    def load(cls, path: Path | None, target_path: Path, *, block: bool) -> Tracker:
        """The state a previous server left, if it is for this target; else a clean one."""
        t = cls(path, target_path)
        if path is None or not path.exists():
            return t
        try:
            data = json.loads(path.read_text())
            offset = data["offset"]
            ok = (data.get("version") == VERSION and data.get("target") == str(target_path)
                  and isinstance(offset, int) and offset >= 0
                  and (block or target_path.exists()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("RESUME state %s unreadable, ignored: %s", path, e)
            ok, offset = False, 0
        if ok:
            t.offset = offset
            log.info("RESUME state found offset=%d target=%s", offset, target_path)
        else:
            t.clear()
        return t

    def save(self, offset: int) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"version": VERSION, "target": str(self.target_path), "offset": offset}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        target.fsync_dir(self.path.parent)
        self.offset = offset

    def clear(self) -> None:
        self.offset = 0
        if self.path is not None and self.path.exists():
            self.path.unlink()
            target.fsync_dir(self.path.parent)


class Checkpointing:
    """A stream.Sink that writes through a Writer and records the offset now and then."""

    def __init__(self, writer: target.Writer, tracker: Tracker,
                 interval: float = CHECKPOINT_INTERVAL) -> None:
        self._writer = writer
        self._tracker = tracker
        self._interval = interval
        self._last = time.monotonic()

    def write(self, buf: bytearray, length: int, *, total: int | None = None) -> None:
        self._writer.write(buf, length, total=total)
        self.tick()

    def tick(self) -> None:
        """Checkpoint if the interval has passed since the last one."""
        if time.monotonic() - self._last >= self._interval:
            self.checkpoint()

    def checkpoint(self) -> int:
        offset = self._writer.sync()
        self._tracker.save(offset)
        self._last = time.monotonic()
        log.info("RESUME checkpoint offset=%d", offset)
        return offset


class _Prefix:
    """The first SIZE bytes of the target, as written (holes and a short file read as 0)."""

    def __init__(self, path: Path, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._size = size
        self._pos = 0

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [buf[:n]], self._pos)
        if got == 0:  # past the end of a file whose last run of zeros is not materialised
            buf[:n] = bytes(n)
            got = n
        self._pos += got
        return got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def replay(path: Path, size: int, fn: Callable[[int, memoryview], object]) -> None:
    """Hand FN (offset, data) the first SIZE bytes of the target, as written, a MiB at a time.

    For a continued upload's checksum: read back, not trusted from memory (the
    server may have restarted since).
    """
    if not size:
        return
    prefix = _Prefix(path, size)
    buf = bytearray(units.MiB)
    pos = 0
    try:
        with memoryview(buf) as view:
            while pos < size:
                n = prefix.readinto(view)
                fn(pos, view[:n])
                pos += n
    finally:
        prefix.close()


def continued(body: Reader, *, path: Path, offset: int,
              checksum: Checksum | None) -> tuple[Reader, stream.Hashing | None]:
    """The reader for a request that continues at OFFSET.

    The client's checksum covers the whole image, so the bytes already on the
    volume are hashed again first (read back, not trusted from memory: the
    server may have restarted since).
    """
    if checksum is None:
        return body, None
    hashing = stream.Hashing(body, checksum)
    replay(path, offset, lambda _, data: hashing.update(data))
    return hashing, hashing
