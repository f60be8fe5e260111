"""Where the image goes: a disk.img file on a filesystem volume, or a block volume.

A filesystem volume gets ``<data dir>/disk.img``, sized by CDI's space maths.
A block volume is a device (or a preallocated raw file standing in for one)
whose size never changes.  ``Writer`` writes a stream sequentially and never
writes runs of zeros: on a file they stay holes, on a block volume they are
discarded with ``fallocate(PUNCH_HOLE)`` (which reads back as zeros), so the
allocated size tracks the image's data, not its virtual size.  Preallocation
reverses that on request.

A writer opened with ``direct=True`` (the clone receiver) writes whole aligned
blocks with ``O_DIRECT`` from the caller's page-aligned buffer, past the page
cache: on the machines we run on, copying into fresh page-cache pages cost
several times what the disk write itself costs in CPU (``docs/clone.md``).
Whatever is not aligned, or a file system that refuses ``O_DIRECT``, takes the
ordinary buffered path; a block is only ever written one of the two ways.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path

from importer import errors, space, units
from importer.settings import Settings

log = logging.getLogger(__name__)

SEGMENT = 64 * units.KiB  # zero-detection granularity
_ZEROS = bytes(4 * units.MiB)  # compared against, never written (except as a fallback)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter already uses
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
# Written data is sent to disk a window at a time while the download goes on, and
# the window before is then dropped from the page cache: the final fsync has
# little left to do, and a memory-limited pod is not charged for gigabytes of
# dirty cache (a cause of importer OOM kills in CDI).
WRITEBACK_WINDOW = 64 * units.MiB
DIRECT_ALIGN = 4 * units.KiB  # offset, length and address of an O_DIRECT write


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    if length > 0 and _libc.sync_file_range(fd, offset, length, flags) != 0:
        # Not fatal here: the final fsync reports any real write error.
        log.debug("sync_file_range failed: %s", os.strerror(ctypes.get_errno()))


def device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Target:
    """The volume being filled, with how many bytes the image may take."""

    def __init__(self, path: Path, *, is_block: bool, capacity: int) -> None:
        self.path = path
        self.is_block = is_block
        self.capacity = capacity

    @classmethod
    def from_settings(cls, settings: Settings) -> Target:
        if settings.is_block:
            size = device_size(settings.block_path)
            return cls(settings.block_path, is_block=True, capacity=size)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(settings.data_dir)
        available = st.f_bavail * st.f_frsize
        if settings.target_file.exists():  # space an old attempt holds is ours to reuse
            available += settings.target_file.stat().st_blocks * 512
        if settings.image_size is not None:
            available = min(available, settings.image_size)
        capacity = space.usable(settings.filesystem_overhead, available)
        return cls(settings.target_file, is_block=False, capacity=capacity)

    def open_writer(self, *, preallocate: bool = False, offset: int = 0,
                    direct: bool = False) -> Writer:
        return Writer.open(self.path, block=self.is_block, capacity=self.capacity,
                           preallocate=preallocate, offset=offset, direct=direct)

    def remove(self) -> None:
        """Throw away what an import wrote (failure or checksum mismatch)."""
        if self.is_block:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                zero_range(fd, 0, self.capacity, allocate=False)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.path.unlink(missing_ok=True)

    def fsync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self.is_block:
            fsync_dir(self.path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_dir(path: Path) -> None:
    """Remove everything inside PATH (an archive's half-extracted contents)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def zero_range(fd: int, offset: int, length: int, *, allocate: bool) -> None:
    """Make [offset, offset+length) read as zeros: discard, or zero-allocate, or write."""
    if length <= 0:
        return
    mode = FALLOC_FL_ZERO_RANGE if allocate else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
            raise
    end = offset + length
    view = memoryview(_ZEROS)
    while offset < end:
        offset += os.pwrite(fd, view[: min(len(_ZEROS), end - offset)], offset)


def _address(view: memoryview) -> int:
    """Where VIEW's bytes are in memory (-1 if it is read-only: never aligned for us)."""
    with contextlib.suppress(TypeError, ValueError):
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    return -1


class Writer:
    """Sequential writer that skips zeros; one per transfer attempt."""

    def __init__(self, fd: int, path: Path, *, block: bool, capacity: int,
                 preallocate: bool, keep_cache: bool = False, direct_fd: int = -1) -> None:
        self._fd = fd
        self._direct_fd = direct_fd  # the same file opened O_DIRECT, or -1
        self._keep_cache = keep_cache
        self.path = path
        self.block = block
        self.capacity = capacity
        self.preallocate = preallocate
        self.offset = 0  # bytes of image consumed so far
        self.data_bytes = 0  # bytes actually written (not zero)
        self._hole_start = 0  # start of the pending run of zeros (== offset if none)
        self._writeback_started = 0  # offsets below this are being written to disk
        self._writeback_done = 0  # offsets below this are on disk and out of the cache

    @classmethod
    def open(cls, path: Path, *, block: bool, capacity: int, preallocate: bool,
             offset: int = 0, keep_cache: bool = False, direct: bool = False) -> Writer:
        """Open for writing from byte 0, or continue at OFFSET (a resumed upload).

        ``keep_cache`` keeps written (clean) pages in the page cache: for a scratch
        image that qemu-img reads back at once, which is then several times faster.

        Continuing drops whatever lies at or past OFFSET (truncated, or discarded on
        a block volume), so data written after the last durable point cannot survive
        under a run of zeros the writer skips.
        """
        if block:
            fd = os.open(path, os.O_WRONLY)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (0 if offset else os.O_TRUNC)
            fd = os.open(path, flags, 0o660)
        direct_fd = -1
        if direct:
            try:
                direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError as e:  # tmpfs and some others: buffered writes only
                log.info("O_DIRECT not available on %s: %s", path, e.strerror)
        w = cls(fd, path, block=block, capacity=capacity, preallocate=preallocate,
                keep_cache=keep_cache, direct_fd=direct_fd)
        if offset:
            try:
                if block:
                    zero_range(fd, offset, capacity - offset, allocate=False)
                else:
                    os.ftruncate(fd, offset)
            except BaseException:
                w.close()
                raise
            w.offset = w._hole_start = w._writeback_started = w._writeback_done = offset
        return w

    def write(self, buf: bytearray, length: int, *, total: int | None = None) -> None:
        """Write buf[:length] at the current offset, leaving zero segments unwritten."""
        end = self.offset + length
        if end > self.capacity:
            if total is not None:
                raise errors.ImageTooLarge(virtual=total, available=self.capacity)
            raise errors.StreamTooLarge(read=self.capacity, available=self.capacity)
        if length <= len(_ZEROS) and buf.startswith(memoryview(_ZEROS)[:length]):
            self.offset = end
            return
        view = memoryview(buf)
        pos = 0
        run_start = -1  # start of the current run of data segments in buf
        while pos < length:
            seg = min(SEGMENT, length - pos)
            if buf.startswith(memoryview(_ZEROS)[:seg], pos):
                if run_start >= 0:
                    self._write_data(view[run_start:pos])
                    run_start = -1
                self.offset += seg
            elif run_start < 0:
                run_start = pos
            pos += seg
        if run_start >= 0:
            self._write_data(view[run_start:length])
        view.release()
        if self.offset - self._writeback_started >= WRITEBACK_WINDOW:
            self._writeback()

    def write_data(self, data: memoryview, *, total: int | None = None) -> None:
        """Write DATA at the current offset as it is, without looking for zeros in it.

        For a caller that has skipped the zeros already (the clone stream).
        With ``direct``, the aligned part of a page-aligned DATA goes past the cache.
        """
        if self.offset + len(data) > self.capacity:
            if total is not None:
                raise errors.ImageTooLarge(virtual=total, available=self.capacity)
            raise errors.StreamTooLarge(read=self.capacity, available=self.capacity)
        if not data:
            return
        if self._direct_fd >= 0 and self.offset % DIRECT_ALIGN == 0 and \
                len(data) >= DIRECT_ALIGN and _address(data) % DIRECT_ALIGN == 0:
            n = len(data) - len(data) % DIRECT_ALIGN
            if self._write_direct(data[:n]):
                data = data[n:]
        if data:
            self._write_data(data)
        if self.offset - self._writeback_started >= WRITEBACK_WINDOW:
            self._writeback()

    def _write_direct(self, data: memoryview) -> bool:
        """Write aligned DATA with O_DIRECT; False (and direct off) if the kernel refuses."""
        self._flush_hole()
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._direct_fd, data[done:], self.offset + done)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.ProcessingError(
                    reason=f"writing {self.path}: no space left on device") from e
            if e.errno != errno.EINVAL or done:
                raise
            log.info("O_DIRECT write refused on %s (%s): buffered from here on", self.path,
                     e.strerror)
            os.close(self._direct_fd)
            self._direct_fd = -1
            return False
        self.offset += done
        self.data_bytes += done
        self._hole_start = self.offset
        return True

    def _writeback(self) -> None:
        start, done = self._writeback_started, self._writeback_done
        _sync_range(self._fd, start, self.offset - start, SYNC_FILE_RANGE_WRITE)
        if start > done:
            _sync_range(self._fd, done, start - done, SYNC_FILE_RANGE_WAIT_BEFORE
                        | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
            if not self._keep_cache:
                os.posix_fadvise(self._fd, done, start - done, os.POSIX_FADV_DONTNEED)
            self._writeback_done = start
        self._writeback_started = self.offset

    def _flush_hole(self) -> None:
        if self.offset > self._hole_start and (self.block or self.preallocate):
            zero_range(self._fd, self._hole_start, self.offset - self._hole_start,
                  allocate=self.preallocate)
        self._hole_start = self.offset

    def _write_data(self, data: memoryview) -> None:
        self._flush_hole()
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], self.offset + done)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.ProcessingError(
                    reason=f"writing {self.path}: no space left on device"
                ) from e
            raise
        self.offset += done
        self.data_bytes += done
        self._hole_start = self.offset

    def sync(self) -> int:
        """Make every byte below the current offset durable; returns that offset."""
        self._flush_hole()
        os.fsync(self._fd)
        return self.offset

    def reset(self) -> None:
        """Begin again at byte 0 (the source restarted from the beginning)."""
        if self.block:
            zero_range(self._fd, 0, max(self.offset, self._hole_start), allocate=False)
        else:
            os.ftruncate(self._fd, 0)
        self.offset = self.data_bytes = self._hole_start = 0
        self._writeback_started = self._writeback_done = 0

    def finish(self) -> int:
        """Materialise trailing zeros, preallocate if asked, fsync; return the image size."""
        self._flush_hole()
        if not self.block:
            os.ftruncate(self._fd, self.offset)
            if self.preallocate and self.offset:
                os.posix_fallocate(self._fd, 0, self.offset)
        os.fsync(self._fd)
        return self.offset

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
