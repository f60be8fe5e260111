"""The sparse stream: a raw disk image as offset-tagged runs of data, holes left out.

Two senders use it.  The clone source worker (``importer.clonesource``) sends
a volume to a clone-mode upload server (``importer.upload.clone``), and
``cdi image-upload`` sends a raw image file to an ordinary upload server
(``Content-Type: application/x-cdi-sparse-stream``, an extension of CDI's
upload protocol, ``docs/upload-protocol.md``).  Either way only the image's
data crosses the network: the sender asks the file system where the data is
(``lseek`` ``SEEK_DATA``/``SEEK_HOLE``) and skips all-zero 64 KiB blocks inside
it, and the receiver writes each frame at its offset with ``O_DIRECT`` where it
is aligned, so a hole in the source stays a hole on the target and no page
cache is filled on the way.  A CDI client sends every byte of a half-empty
image instead, and the upload server looks at every byte for zeros.

Wire format (big-endian)::

    header  magic "CDICLONE" (8)  version u32 = 1  flags u32 = 0  virtual size u64
    frame   offset u64  length u32 (> 0)  data (length bytes)     ... any number
    end     offset u64 = virtual size  length u32 = 0

Frames are in increasing offset order and do not overlap; bytes no frame
covers read as zeros.  The body ends right after the end frame.  Anything
else is refused (a 400) and nothing is kept.  A resumed upload (``?offset=N``)
sends the same header and only frames at or past N.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator

from importer import formats, stream, target, units
from importer.formats import Reader
from importer.progress import Progress
from importer.settings import Checksum
from importer.upload import body as body_mod

MEDIA_TYPE = "application/x-cdi-sparse-stream"
"""The Content-Type of a sparse upload; upload servers list it in ``Accept-Post``."""
MAGIC = b"CDICLONE"
VERSION = 1
HEAD = struct.Struct(">8sIIQ")  # magic, version, flags, virtual size
FRAME = struct.Struct(">QI")  # offset, length; length 0 ends the stream
MAX_FRAME = (1 << 32) - 1
BUFFER_SIZE = 4 * units.MiB
BUFFERS = 3  # in flight between the request thread and the writer thread
CHUNK = 4 * units.MiB  # bytes read from the source at a time by the encoder; the largest frame
SEGMENT = target.SEGMENT  # zero-detection granularity
ROOM = 64  # bytes kept free before a frame's data for a chunk and frame header
_ZEROS = memoryview(bytes(CHUNK))


class MalformedStream(body_mod.MalformedBody):
    """The body is not a well-formed sparse stream (a 400)."""

    msg = "malformed sparse stream: {self.reason}"


class NotRaw(body_mod.MalformedBody):
    """A sparse upload whose image is not raw: it would be written byte for byte."""

    msg = ("a sparse stream carries a raw image, but this one starts with a {self.format} "
           "header: upload the file as it is, not as a sparse stream")
    format: str


def encode_head(size: int) -> bytes:
    return HEAD.pack(MAGIC, VERSION, 0, size)


def encode_end(size: int) -> bytes:
    return FRAME.pack(size, 0)


# --- the sender's side ----------------------------------------------------------------


def extents(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of data in bytes [START, SIZE) of FD, in order.

    Without SEEK_DATA (a block device, some filesystems) all of it is one run.
    """
    pos = start
    while pos < size:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from POS on
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size - pos
                return
            raise
        if begin >= size:
            return
        end = min(os.lseek(fd, begin, os.SEEK_HOLE), size)
        yield begin, end - begin
        pos = end


def data_runs(buf: bytearray, start: int, length: int,
              offset: int) -> list[tuple[int, int]]:
    """The [a, b) index ranges of BUF[START:START+LENGTH] that are not all-zero SEGMENTs.

    Segments are aligned on the source's offsets (OFFSET is where BUF[START]
    comes from), so the same zero block is found wherever a read begins.
    """
    runs: list[tuple[int, int]] = []
    end = start + length
    if buf.startswith(_ZEROS[:length], start):
        return runs
    pos = start
    run = -1
    while pos < end:
        seg_end = min(pos + SEGMENT - (offset + pos - start) % SEGMENT, end)
        if buf.startswith(_ZEROS[: seg_end - pos], pos):
            if run >= 0:
                runs.append((run, pos))
                run = -1
        elif run < 0:
            run = pos
        pos = seg_end
    if run >= 0:
        runs.append((run, end))
    return runs


def encode(fd: int, size: int, *, start: int = 0,
           reached: Callable[[int], None] = lambda n: None) -> Iterator[memoryview]:
    """The sparse stream of the first SIZE bytes of FD, frames from START on.

    Each item is only valid until the next one is asked for (one buffer is
    reused): send it before iterating on.  A frame comes as one item, its
    header in the bytes right before its data (the room at the buffer's start,
    or a zero segment that is not sent).  REACHED is called with the offset
    in the image up to which everything was handed out, for a progress display.
    """
    yield memoryview(encode_head(size))
    buf = bytearray(ROOM + CHUNK)
    with memoryview(buf) as view:
        for begin, length in extents(fd, size, start):
            pos, end = begin, begin + length
            while pos < end:
                n = min(CHUNK - pos % CHUNK, end - pos)  # reads aligned on CHUNK
                _pread(fd, view[ROOM: ROOM + n], pos)
                for a, b in data_runs(buf, ROOM, n, pos):
                    p = a - FRAME.size
                    FRAME.pack_into(buf, p, pos + a - ROOM, b - a)
                    yield view[p:b]
                pos += n
                reached(pos)
    yield memoryview(encode_end(size))
    reached(size)


def _pread(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"the file ended at byte {offset + done}, inside its "
                                     "data: it changed while being sent")
        done += n


# --- the receiver's side --------------------------------------------------------------


def read_head(body: Reader, error: type[MalformedStream] = MalformedStream) -> int:
    """Read and check the header; return the image's virtual size."""
    head = bytearray(HEAD.size)
    with memoryview(head) as view:
        _fill(body, view, "inside the stream header", 0, error)
    magic, version, flags, size = HEAD.unpack_from(head)
    if magic != MAGIC:
        raise error(reason=f"bad magic {bytes(magic)[:8]!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise error(reason=f"version {version} is not supported (only {VERSION})")
    if flags:
        raise error(reason=f"unknown flags {flags:#x}")
    if size == 0:
        raise error(reason="the image size is 0")
    return int(size)


class Hashing:
    """The checksum of the image a sparse stream describes: its data and its zeros."""

    def __init__(self, checksum: Checksum) -> None:
        self._hashing = stream.Hashing(_NOTHING, checksum)
        self.end = 0  # bytes of the image hashed so far

    def data(self, offset: int, data: memoryview) -> None:
        self._zeros(offset - self.end)
        self._hashing.update(data)
        self.end = offset + len(data)

    def verify(self, size: int) -> None:
        self._zeros(size - self.end)
        self.end = size
        self._hashing.verify()

    def _zeros(self, n: int) -> None:
        while n > 0:
            m = min(n, len(_ZEROS))
            self._hashing.update(_ZEROS[:m])
            n -= m


class _Nothing:
    """A Reader with nothing in it: the frames' data is hashed as it is written."""

    def readinto(self, buf: memoryview) -> int:
        return 0


_NOTHING = _Nothing()


def write_frames(body: Reader, w: target.Writer, *, size: int, start: int = 0,
                 progress: Progress | None = None,
                 error: type[MalformedStream] = MalformedStream, raw_only: bool = False,
                 on_data: Callable[[int, memoryview], None] | None = None,
                 after_write: Callable[[], None] | None = None) -> int:
    """Write the frames of BODY (after its header) through W; return their number.

    W is at START (0, or where a resumed upload continues).  This thread reads
    and checks the frames into page-aligned buffers; a writer thread writes
    them, so the network and the disk work at once.  ON_DATA (a checksum) and
    AFTER_WRITE (a resume checkpoint, which may sync W) run in the writer
    thread, in order.  RAW_ONLY refuses an image whose first bytes are a
    format qemu-img would convert, or a compression.  PROGRESS counts the
    frames' data as bytes read and the position in the image as the percent.
    On any error the writer thread has finished (what it was handed is
    written) before it is raised.
    """
    pipe = _Pipe(w, size, on_data, after_write)
    try:
        frames = _frames(body, pipe, size, start, progress, error, raw_only)
    except BaseException:
        pipe.stop()
        raise
    pipe.stop()
    pipe.check()
    return frames


def skip_to(w: target.Writer, offset: int) -> None:
    """Move the writer to OFFSET as if zeros had been written up to it.

    Writer.offset is where the next write lands; bytes it passes without a
    write form the pending run of zeros, which the writer leaves as a hole (a
    new file), discards (block) or zero-allocates (preallocation) on its next
    write or at finish, exactly as for zeros it skipped itself.
    """
    if offset > w.offset:
        w.offset = offset


def _frames(body: Reader, pipe: _Pipe, size: int, start: int, progress: Progress | None,
            error: type[MalformedStream], raw_only: bool) -> int:
    head = bytearray(FRAME.size)
    frames = 0
    end = start  # where the previous frame ended
    with memoryview(head) as view:
        while True:
            where = f"after frame {frames} (offset {end})" if frames else "after the header"
            if not _fill(body, view, where, frames, error, allow_eof=True):
                raise error(reason=f"the stream ended {where}, before its end frame")
            offset, length = FRAME.unpack_from(head)
            if length == 0:
                if offset != size:
                    raise error(reason=f"the end frame says offset {offset}, "
                                       f"expected the image size {size}")
                break
            frames += 1
            if offset < end:
                if frames == 1:
                    raise error(reason=f"frame 1 at offset {offset} is before offset {start}, "
                                       "where this request continues the upload")
                raise error(reason=f"frame {frames} at offset {offset} overlaps or "
                                   f"precedes the previous one, which ends at {end}")
            if offset + length > size:
                raise error(reason=f"frame {frames} [{offset}, {offset + length}) "
                                   f"ends beyond the image size {size}")
            done = 0
            while done < length:
                buf = pipe.buffer()
                n = min(length - done, len(buf))
                with memoryview(buf) as data:
                    _fill(body, data[:n], f"inside frame {frames} (offset {offset})", frames,
                          error)
                    if raw_only and offset + done == 0:
                        kind = formats.kind_of(bytes(data[: min(n, formats.HEADER_SIZE)]))
                        if kind != "raw":
                            pipe.release(buf)
                            raise NotRaw(format=kind)
                pipe.put(buf, offset + done, n)
                done += n
                if progress is not None:  # per buffer, not per read: reads are 16 KiB
                    progress.add_read(n)
                    progress.set_percent(100.0 * (offset + done) / size)
            end = offset + length
        if body.readinto(view[:1]):
            raise error(reason="data after the end frame")
    return frames


class _Pipe:
    """Frame data from the request thread to a writer thread; BUFFERS buffers go round.

    The buffers are anonymous mmaps, so they are page-aligned, as O_DIRECT
    writes need.
    """

    def __init__(self, writer: target.Writer, size: int,
                 on_data: Callable[[int, memoryview], None] | None,
                 after_write: Callable[[], None] | None) -> None:
        self._writer = writer
        self._size = size
        self._on_data = on_data
        self._after_write = after_write
        self._free: queue.Queue[mmap.mmap | None] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, BUFFER_SIZE))
        self._full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sparse-writer", daemon=True)
        self._thread.start()

    def buffer(self) -> mmap.mmap:
        """A free buffer; raises the writer's error if it failed."""
        buf = self._free.get()
        if buf is None:
            self.check()
            raise AssertionError("the sparse writer stopped without an error")
        return buf

    def release(self, buf: mmap.mmap) -> None:
        self._free.put(buf)

    def put(self, buf: mmap.mmap, offset: int, length: int) -> None:
        self._full.put((buf, offset, length))

    def stop(self) -> None:
        """Let the writer finish what it was given, and wait for it."""
        self._full.put(None)
        self._thread.join()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while (item := self._full.get()) is not None:
                buf, offset, length = item
                skip_to(self._writer, offset)
                with memoryview(buf) as view:
                    if self._on_data is not None:
                        self._on_data(offset, view[:length])
                    self._writer.write_data(view[:length], total=self._size)
                if self._after_write is not None:
                    self._after_write()
                self._free.put(buf)
        except BaseException as e:  # raised in the request thread (buffer, check)
            self._error = e
            self._free.put(None)


def _fill(body: Reader, view: memoryview, where: str, frames: int,
          error: type[MalformedStream], *, allow_eof: bool = False) -> bool:
    """Read exactly len(VIEW) bytes; False if the body ended first and ALLOW_EOF."""
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            if allow_eof and got == 0:
                return False
            raise error(reason=f"the stream ended {where}, before its end frame "
                               f"({frames} frames received)")
        got += n
    return True

