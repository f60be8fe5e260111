"""The sparse clone stream: its wire format, and the upload server's side of it.

KubeVirt CDI's host-assisted clone sends the whole source (a tar of the
filesystem, or every byte of the block device) snappy-compressed, zeros and
all.  Ours sends only the source's data: the clone source worker
(``importer.clonesource``) finds the allocated extents and skips all-zero
blocks inside them, and frames what is left with its offset.  The upload
server, started in clone mode (``UPLOAD_CLONE=true``), writes each frame at
its offset with the sparse ``target.Writer``, so a hole in the source stays a
hole on the target, whichever volume modes the two have (the payload is the
disk image either way).  ``docs/clone.md`` describes the format for other
implementations.

Wire format (big-endian), the body of ``POST /v1beta1/upload`` with
``x-cdi-content-type: sparse-clone``::

    header  magic "CDICLONE" (8)  version u32 = 1  flags u32 = 0  virtual size u64
    frame   offset u64  length u32 (> 0)  data (length bytes)     ... any number
    end     offset u64 = virtual size  length u32 = 0

Frames are in increasing offset order and do not overlap; bytes no frame
covers read as zeros.  The body ends right after the end frame.  Anything
else is refused with 400 and nothing is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import queue
import struct
import threading

from importer import errors, target, units
from importer.formats import Reader
from importer.progress import Progress
from importer.upload import body as body_mod

log = logging.getLogger(__name__)

HEADER = "x-cdi-content-type"
CONTENT_TYPE = "sparse-clone"
MAGIC = b"CDICLONE"
VERSION = 1
HEAD = struct.Struct(">8sIIQ")  # magic, version, flags, virtual size
FRAME = struct.Struct(">QI")  # offset, length; length 0 ends the stream
MAX_FRAME = (1 << 32) - 1
BUFFER_SIZE = 4 * units.MiB
BUFFERS = 3  # in flight between the request thread and the writer thread
# CDI's clone stream types: a snappy-compressed tar or device; not spoken here.
CDI_TYPES = ("filesystem-clone", "blockdevice-clone")
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no", ""}


class MalformedStream(body_mod.MalformedBody):
    """The body is not a well-formed sparse clone stream (a 400)."""

    msg = "malformed clone stream: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Received:
    size: int  # the image's virtual size
    frames: int  # data frames received
    data_bytes: int  # bytes written (frame data that was not zeros)
    preallocated: bool


def encode_head(size: int) -> bytes:
    return HEAD.pack(MAGIC, VERSION, 0, size)


def encode_end(size: int) -> bytes:
    return FRAME.pack(size, 0)


def mode_from_env(value: str | None) -> bool:
    """``UPLOAD_CLONE``: whether the upload server takes a clone instead of an upload."""
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise errors.SettingsError(variable="UPLOAD_CLONE",
                               reason=f"{value!r} is not a boolean (true/false)")


def refusal(content_type: str | None, *, clone_mode: bool, sync_upload: bool,
            offset: bool) -> str | None:
    """Why a POST cannot be taken as (or, in clone mode, instead of) a clone; None if it can.

    A server in clone mode takes only a sparse clone stream, and only a server
    in clone mode takes one: the two must never be confused.  SYNC_UPLOAD: the
    POST went to ``/v1beta1/upload`` (or v1alpha1); OFFSET: it has ``?offset``.
    """
    wanted = (content_type or "").strip().lower()
    if wanted == CONTENT_TYPE and not clone_mode:
        return (f"{HEADER}: {CONTENT_TYPE} refused: this upload server is not in clone mode "
                "(a clone needs an upload server started for it, with UPLOAD_CLONE=true)")
    if not clone_mode:
        return None
    if wanted in CDI_TYPES:
        return (f"{HEADER}: {wanted} (CDI's snappy clone stream) is not supported: the clone "
                f"source must send {CONTENT_TYPE}")
    if wanted != CONTENT_TYPE:
        return (f"this upload server is in clone mode: it takes only a clone, POST "
                f"/v1beta1/upload with {HEADER}: {CONTENT_TYPE}")
    if not sync_upload:
        return f"a {CONTENT_TYPE} stream goes to /v1beta1/upload"
    if offset:
        return "a clone cannot continue at an offset: it starts again from byte 0"
    return None


def receive(body: Reader, tgt: target.Target, *, preallocate: bool,
            progress: Progress | None = None) -> Received:
    """Write the sparse clone stream BODY onto TGT; raise on anything malformed.

    The target is rewritten from byte 0: a filesystem volume's disk.img is
    truncated and grown to the declared size, a block volume has every byte
    outside the frames discarded (read as zeros).  With PREALLOCATE the whole
    image is allocated.  Frame data is written as it comes, with O_DIRECT where
    it is aligned (``target.Writer.write_data``): the source skipped the zero
    blocks already, and the gaps between frames stay holes.  This thread reads
    and checks the frames into page-aligned buffers; a writer thread writes
    them, so the network and the disk work at once.
    PROGRESS counts the bytes of the frames' data as bytes read (there is no
    total to count them against: the source knows how much data it has).
    """
    head = bytearray(HEAD.size)
    with memoryview(head) as view:
        _fill(body, view, "inside the stream header", 0)
    magic, version, flags, size = HEAD.unpack_from(head)
    if magic != MAGIC:
        raise MalformedStream(reason=f"bad magic {bytes(magic)[:8]!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise MalformedStream(reason=f"version {version} is not supported (only {VERSION})")
    if flags:
        raise MalformedStream(reason=f"unknown flags {flags:#x}")
    if size == 0:
        raise MalformedStream(reason="the image size is 0")
    if size > tgt.capacity:
        raise errors.ImageTooLarge(virtual=size, available=tgt.capacity)
    log.info("CLONE size=%d capacity=%d block=%s preallocate=%s", size, tgt.capacity,
             tgt.is_block, preallocate)
    with tgt.open_writer(preallocate=preallocate, direct=True) as w:
        pipe = _Pipe(w, size)
        try:
            frames = _frames(body, pipe, size, progress)
        except BaseException:
            pipe.stop()
            raise
        pipe.stop()
        pipe.check()
        # The rest reads as zeros: a file is truncated to SIZE, a device discarded
        # (or, preallocating, zero-allocated) up to its end.
        _skip_to(w, tgt.capacity if tgt.is_block else size)
        w.finish()
        data = w.data_bytes
    log.info("CLONE received size=%d frames=%d data=%d", size, frames, data)
    return Received(size=size, frames=frames, data_bytes=data, preallocated=preallocate)


def _frames(body: Reader, pipe: _Pipe, size: int, progress: Progress | None) -> int:
    """Read and check the frames up to the end of the body; hand their data to PIPE."""
    head = bytearray(FRAME.size)
    frames = 0
    end = 0  # where the previous frame ended
    with memoryview(head) as view:
        while True:
            where = f"after frame {frames} (offset {end})" if frames else "after the header"
            if not _fill(body, view, where, frames, allow_eof=True):
                raise MalformedStream(reason=f"the stream ended {where}, before its end frame")
            offset, length = FRAME.unpack_from(head)
            if length == 0:
                if offset != size:
                    raise MalformedStream(reason=f"the end frame says offset {offset}, "
                                                 f"expected the image size {size}")
                break
            frames += 1
            if offset < end:
                raise MalformedStream(reason=f"frame {frames} at offset {offset} overlaps or "
                                             f"precedes the previous one, which ends at {end}")
            if offset + length > size:
                raise MalformedStream(reason=f"frame {frames} [{offset}, {offset + length}) "
                                             f"ends beyond the image size {size}")
            done = 0
            while done < length:
                buf = pipe.buffer()
                n = min(length - done, len(buf))
                with memoryview(buf) as data:
                    _fill(body, data[:n], f"inside frame {frames} (offset {offset})", frames)
                pipe.put(buf, offset + done, n)
                done += n
                if progress is not None:  # per buffer, not per read: reads are 16 KiB
                    progress.add_read(n)
            end = offset + length
        if body.readinto(view[:1]):
            raise MalformedStream(reason="data after the end frame")
    return frames


class _Pipe:
    """Frame data from the request thread to a writer thread; BUFFERS buffers go round.

    The buffers are anonymous mmaps, so they are page-aligned, as O_DIRECT
    writes need.
    """

    def __init__(self, writer: target.Writer, size: int) -> None:
        self._writer = writer
        self._size = size
        self._free: queue.Queue[mmap.mmap | None] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, BUFFER_SIZE))
        self._full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clone-writer", daemon=True)
        self._thread.start()

    def buffer(self) -> mmap.mmap:
        """A free buffer; raises the writer's error if it failed."""
        buf = self._free.get()
        if buf is None:
            self.check()
            raise AssertionError("the clone writer stopped without an error")
        return buf

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
                _skip_to(self._writer, offset)
                with memoryview(buf) as view:
                    self._writer.write_data(view[:length], total=self._size)
                self._free.put(buf)
        except BaseException as e:  # raised in the request thread (buffer, check)
            self._error = e
            self._free.put(None)


def _skip_to(w: target.Writer, offset: int) -> None:
    """Move the writer to OFFSET as if zeros had been written up to it.

    Writer.offset is where the next write lands; bytes it passes without a
    write form the pending run of zeros, which the writer leaves as a hole (a
    new file), discards (block) or zero-allocates (preallocation) on its next
    write or at finish, exactly as for zeros it skipped itself.
    """
    if offset > w.offset:
        w.offset = offset


def _fill(body: Reader, view: memoryview, where: str, frames: int, *,
          allow_eof: bool = False) -> bool:
    """Read exactly len(VIEW) bytes; False if the body ended first and ALLOW_EOF."""
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            if allow_eof and got == 0:
                return False
            raise MalformedStream(reason=f"the stream ended {where}, before its end frame "
                                         f"({frames} frames received)")
        got += n
    return True
