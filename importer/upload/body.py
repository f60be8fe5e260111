"""Request bodies as Readers: a Content-Length body, a chunked one, a form's file part.

``http.server`` hands a handler the raw socket stream; these classes frame it
(RFC 9112 length or chunked coding, RFC 7578 multipart/form-data) and offer
``readinto``, so the upload streams through ``formats.detect`` and the copy
loop like a download does.  Nothing is read whole: the form parser keeps one
fixed buffer and hands out data as soon as it cannot be part of the boundary.
A connection that ends early raises ``ClientDisconnected`` with the byte count,
which is what a resumable upload checkpoints.
"""

from __future__ import annotations

import email.message
import email.utils
import io
import logging
from typing import Protocol

from importer import errors, units
from importer.formats import Reader
from importer.progress import Progress

log = logging.getLogger(__name__)

MAX_LINE = 4096  # a chunk-size line or a trailer
FORM_BUFFER = units.MiB
_DISCARD = bytearray(256 * units.KiB)  # shared: what drain reads here is never looked at


class ClientDisconnected(errors.Error):
    """The request body ended before its declared end (closed, reset or stalled)."""

    msg = "the upload was cut short after {self.received} bytes: {self.reason}"
    received: int
    reason: str


class MalformedBody(errors.Error):
    msg = "malformed request body: {self.reason}"
    reason: str


class Body(Protocol):
    """A request body: a Reader that counts what it delivered and can skip the rest."""

    received: int

    def readinto(self, buf: memoryview) -> int: ...

    def drain(self, limit: int) -> bool:
        """Read and drop up to LIMIT bytes; True if the body then ended."""
        ...


class _Framed:
    def __init__(self, rfile: io.BufferedIOBase) -> None:
        self._rfile = rfile
        self.received = 0
        # Set once the upload is admitted: a refused body is drained, not counted.
        self.progress: Progress | None = None

    def _read(self, buf: memoryview) -> int:
        try:
            n = self._rfile.readinto(buf)
        except (OSError, ValueError) as e:  # reset, timeout, TLS error, closed file
            raise ClientDisconnected(received=self.received, reason=str(e) or type(e).__name__
                                     ) from e
        if not n:
            raise ClientDisconnected(received=self.received,
                                     reason="the connection closed before the end of the body")
        return int(n)

    def _count(self, n: int) -> None:
        self.received += n
        if self.progress is not None:
            self.progress.add_read(n)

    def readinto(self, buf: memoryview) -> int:
        raise NotImplementedError

    def drain(self, limit: int) -> bool:
        done = 0
        with memoryview(_DISCARD) as view:
            while done < limit:
                try:
                    n = self.readinto(view[: min(len(view), limit - done)])
                except (ClientDisconnected, MalformedBody):
                    return False
                if not n:
                    return True
                done += n
        return False


class LengthBody(_Framed):
    """A body of Content-Length bytes."""

    def __init__(self, rfile: io.BufferedIOBase, length: int) -> None:
        super().__init__(rfile)
        self.length = length

    def readinto(self, buf: memoryview) -> int:
        left = self.length - self.received
        if left <= 0:
            return 0
        n = self._read(buf[:left] if len(buf) > left else buf)
        self._count(n)
        return n


class ChunkedBody(_Framed):
    """A body in the chunked transfer coding; trailers are read and ignored."""

    def __init__(self, rfile: io.BufferedIOBase) -> None:
        super().__init__(rfile)
        self._left = 0  # bytes left in the current chunk
        self._done = False

    def _line(self) -> bytes:
        try:
            line = self._rfile.readline(MAX_LINE + 1)
        except (OSError, ValueError) as e:
            raise ClientDisconnected(received=self.received, reason=str(e)) from e
        if not line.endswith(b"\n"):
            if len(line) <= MAX_LINE:
                raise ClientDisconnected(received=self.received,
                                         reason="the connection closed inside the chunked body")
            raise MalformedBody(reason="a chunk-size line is too long")
        return line.rstrip(b"\r\n")

    def _next_chunk(self) -> None:
        size = self._line().split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            raise MalformedBody(reason=f"bad chunk size {size[:20]!r}") from None
        if self._left < 0:
            raise MalformedBody(reason="negative chunk size")
        if self._left == 0:
            while self._line():  # trailer fields, up to the empty line
                pass
            self._done = True

    def readinto(self, buf: memoryview) -> int:
        while self._left == 0:
            if self._done:
                return 0
            self._next_chunk()
        n = self._read(buf[: self._left] if len(buf) > self._left else buf)
        self._left -= n
        self._count(n)
        if self._left == 0 and self._line():
            raise MalformedBody(reason="a chunk is longer than its size")
        return n


def form_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; MalformedBody if there is none."""
    m = email.message.Message()
    m["Content-Type"] = content_type
    boundary = m.get_param("boundary")
    if m.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise MalformedBody(reason="the form endpoints need multipart/form-data with a boundary")
    if not 1 <= len(boundary) <= 70:
        raise MalformedBody(reason="a multipart boundary has 1 to 70 characters")
    return boundary.encode("latin-1")


def _part_name(headers: bytes) -> str | None:
    m = email.message.Message()
    for line in headers.decode("latin-1").split("\r\n"):
        field, sep, text = line.partition(":")
        if sep:
            m[field.strip()] = text.strip()
    name = m.get_param("name", header="content-disposition")
    if name is None or isinstance(name, str):
        return name
    return str(email.utils.collapse_rfc2231_value(name))


class FormFile:
    """The content of the part named FIELD of a multipart/form-data body, streamed.

    The buffer holds what was read but not handed out: while looking for the
    next delimiter (CRLF "--" boundary), the last len(delimiter)-1 bytes are held
    back, since they may be its beginning.
    """

    def __init__(self, src: Reader, boundary: bytes, field: str = "file") -> None:
        self._src = src
        self._field = field
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(FORM_BUFFER)
        self._view = memoryview(self._buf)
        # The first delimiter has no CRLF before it when there is no preamble.
        self._buf[:2] = b"\r\n"
        self._start, self._end = 0, 2
        self._eof = False
        self._state = "start"  # -> "data" -> "done"

    def _more(self) -> None:
        if self._start:
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            raise MalformedBody(reason="the headers of a form part are too long")
        n = self._src.readinto(self._view[self._end :])
        self._eof = n == 0
        self._end += n

    def _find(self, needle: bytes) -> int:
        return self._buf.find(needle, self._start, self._end)

    def _next_part(self) -> str | None:
        """Move past the next delimiter and its headers: the part's name ("" if none).

        None at the closing delimiter.
        """
        while (i := self._find(self._delim)) < 0:
            self._start = max(self._start, self._end - len(self._delim) + 1)
            if self._eof:
                raise MalformedBody(reason="the form has no closing boundary")
            self._more()
        self._start = i + len(self._delim)
        while self._end - self._start < 2 and not self._eof:
            self._more()
        if self._buf[self._start : self._start + 2] == b"--":
            return None
        while (j := self._find(b"\r\n\r\n")) < 0:
            if self._eof:
                raise MalformedBody(reason="the form ended inside the headers of a part")
            self._more()
        headers = bytes(self._view[self._start + 2 : j])
        self._start = j + 4
        return _part_name(headers) or ""

    def readinto(self, buf: memoryview) -> int:
        while self._state == "start":
            name = self._next_part()
            if name is None:
                raise MalformedBody(reason=f"the form has no part named {self._field!r}")
            if name == self._field:
                self._state = "data"
        while self._state == "data":
            i = self._find(self._delim)
            hold = 0 if i >= 0 else len(self._delim) - 1
            avail = (i if i >= 0 else self._end) - self._start - hold
            if avail > 0:
                n = min(avail, len(buf))
                buf[:n] = self._view[self._start : self._start + n]
                self._start += n
                return n
            if i >= 0:
                self._state = "done"
                break
            if self._eof:
                raise MalformedBody(reason="the form ended inside the file part")
            self._more()
        return 0
