"""One attempt of a clone source: read the source's data and POST it as a sparse stream.

``importer.clonesource`` is the worker (settings, retries, metrics, the
termination message); this is what one attempt does.  A reader thread reads
the source's data extents ahead of the sender (a clone source is usually not
in the page cache), the sender frames the non-zero runs (``upload.sparse``)
into one chunked ``POST /v1beta1/upload`` over TLS or the target's Unix
socket, and watches for an early answer: an upload server that refuses the
stream answers before it has read it all, and that answer says more than the
reset that would follow.  A failure on the connection is ``Dropped`` (the
worker tries again from byte 0); any answer but 200 is ``Refused`` (final).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import queue
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import prometheus_client

from importer import errors, units
from importer.progress import Progress
from importer.upload import clone, localsocket, sparse

if TYPE_CHECKING:
    from importer.clonesource import Config

log = logging.getLogger("importer.clonesource")

CHUNK = 4 * units.MiB  # bytes read from the source at a time; the largest frame
ROOM = 64  # bytes kept free before a frame's data for the chunk and frame header
MAX_ANSWER = 4096  # characters of a refusal kept for the termination message
BUFFERS = 3  # read ahead of the sender
READER_JOIN_TIMEOUT = 5.0


class CloneError(errors.Error):
    prefix = "Unable to clone data: "
    msg = "{self.reason}"
    reason: str


class Refused(CloneError):
    """The upload server answered something other than 200: final."""

    msg = "the upload server answered {self.status} {self.status_text}: {self.text}"
    status: int
    status_text: str
    text: str


class Dropped(CloneError):
    """The attempt failed on the connection; a new attempt may succeed."""

# --- the source -----------------------------------------------------------------------


def _pread(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise CloneError(reason=f"reading the source at byte {offset + done}: "
                                    f"{e.strerror or e}") from e
        if n == 0:
            raise CloneError(reason=f"the source ended at byte {offset + done}, inside its "
                                    "data: it changed while being cloned")
        done += n


class _Reader:
    """The source's data, CHUNK bytes at a time, read by a thread ahead of the sender.

    A clone source is usually not in the page cache: reading ahead lets the
    disk and the network work at once.  BUFFERS buffers (with ROOM bytes free
    before the data) go round; iterating yields (buffer, offset, length), and
    each buffer is handed back with release() once sent.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(ROOM + CHUNK))
        self._full: queue.Queue[tuple[bytearray, int, int] | BaseException | None] = \
            queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clone-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for start, length in sparse.extents(self._fd, self._size):
                pos, end = start, start + length
                while pos < end:
                    buf = self._free.get()
                    if buf is None or self._stop.is_set():
                        return
                    n = min(CHUNK - pos % CHUNK, end - pos)  # reads aligned on CHUNK
                    with memoryview(buf) as view:
                        _pread(self._fd, view[ROOM : ROOM + n], pos)
                    self._full.put((buf, pos, n))
                    pos += n
            self._full.put(None)
        except BaseException as e:  # raised in the sending thread
            self._full.put(e)

    def __iter__(self) -> Iterator[tuple[bytearray, int, int]]:
        while (item := self._full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf: bytearray) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)
        self._thread.join(timeout=READER_JOIN_TIMEOUT)


# --- one attempt ----------------------------------------------------------------------


class _Early(io.RawIOBase):
    """The response: bytes read while still sending (an early answer), then the socket."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        super().__init__()
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._sock.recv_into(buf)


class _Response:
    """What http.client.HTTPResponse needs of a socket: makefile()."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._file = io.BufferedReader(_Early(head, sock))

    def makefile(self, mode: str) -> io.BufferedReader[_Early]:
        return self._file


class Attempt:
    """One POST of the whole stream over one connection."""

    def __init__(self, config: Config, ctx: ssl.SSLContext | None, progress: Progress,
                 sent_metric: prometheus_client.Gauge) -> None:
        self._config = config
        self._ctx = ctx
        self._progress = progress
        self._sent_metric = sent_metric
        self._timeout = config.importer.stall_timeout
        self._sock: socket.socket | None = None
        self._chunk_open = False  # a chunk's data went out; its CRLF goes before the next
        self._early = b""  # the server answered while we were sending
        self._answered = False
        self.sent = 0  # request body bytes

    def run(self, fd: int, size: int, allocated: int, percent: Percent) -> None:
        cfg = self._config
        raw = self._connect()
        try:
            if self._ctx is not None:
                try:
                    self._sock = self._ctx.wrap_socket(raw, server_hostname=cfg.host)
                except ssl.SSLError as e:
                    raise _tls_error(e) from e
                except OSError as e:
                    raise Dropped(reason=f"TLS handshake with {cfg.host}:{cfg.port}: "
                                         f"{e.strerror or e}") from e
            else:
                self._sock = raw
            self._exchange(fd, size, allocated, percent)
        finally:
            (self._sock or raw).close()

    def _connect(self) -> socket.socket:
        cfg = self._config
        if cfg.socket is None:
            try:
                return socket.create_connection((cfg.host, cfg.port), timeout=self._timeout)
            except OSError as e:
                raise Dropped(reason=f"cannot connect to {cfg.target}: {e.strerror or e}") from e
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._timeout)
            sock.connect(str(cfg.socket))
            if not localsocket.trusted_peer(sock):
                # Only our user can create a file in the socket's directory (checked with
                # the settings); a peer of another uid is not our upload server.
                raise CloneError(reason=f"{cfg.socket} is served by uid "
                                        f"{localsocket.peer_uid(sock)}, not by our user")
        except OSError as e:
            sock.close()
            raise Dropped(reason=f"cannot connect to {cfg.target}: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            raise
        return sock

    def _exchange(self, fd: int, size: int, allocated: int, percent: Percent) -> None:
        cfg = self._config
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        if cfg.port:
            host += f":{cfg.port}"
        head = (f"POST {cfg.path} HTTP/1.1\r\nHost: {host}\r\n"
                f"User-Agent: cdi-clone-source\r\nContent-Type: application/octet-stream\r\n"
                f"Transfer-Encoding: chunked\r\n{clone.HEADER}: {clone.CONTENT_TYPE}\r\n"
                f"Connection: close\r\n\r\n").encode("ascii")
        try:
            self._send(memoryview(head), body=False)
            self._chunk(sparse.encode_head(size))
            self._frames(fd, size, allocated, percent)
            if not self._answered:
                end = sparse.encode_end(size)
                tail = (b"\r\n" if self._chunk_open else b"") + b"%x\r\n" % len(end) + end
                self._send(memoryview(tail + b"\r\n0\r\n\r\n"))
        except (OSError, ssl.SSLError) as e:
            # The server may have answered and closed: its answer says more than a reset.
            if not self._read_early(wait=1.0):
                raise _connection_error(e, "sending") from e
        self._response()

    def _frames(self, fd: int, size: int, allocated: int, percent: Percent) -> None:
        done = 0  # allocated bytes read (sent, or skipped as zeros)
        reader = _Reader(fd, size)
        try:
            for buf, pos, n in reader:
                self._progress.add_read(n)
                with memoryview(buf) as view:
                    for a, b in sparse.data_runs(buf, ROOM, n, pos):
                        self._frame(buf, view, a, b, pos + a - ROOM)
                        if self._answered:
                            return
                reader.release(buf)
                done += n
                percent.set_percent(100.0 * done / allocated if allocated else 100.0)
        finally:
            reader.close()

    def _frame(self, buf: bytearray, view: memoryview, a: int, b: int, offset: int) -> None:
        """Send view[a:b] as the frame at OFFSET, in one chunk of the chunked body.

        The chunk and frame header go in the bytes right before the data: the
        room at the buffer's start, or a zero segment that is not sent.
        """
        length = b - a
        prefix = ((b"\r\n" if self._chunk_open else b"") + b"%x\r\n" % (sparse.FRAME.size + length)
                  + sparse.FRAME.pack(offset, length))
        p = a - len(prefix)
        buf[p:a] = prefix
        self._send(view[p:b])
        self._chunk_open = True

    def _chunk(self, data: bytes) -> None:
        prefix = (b"\r\n" if self._chunk_open else b"") + b"%x\r\n" % len(data)
        self._send(memoryview(prefix + data))
        self._chunk_open = True

    def _send(self, data: memoryview, *, body: bool = True) -> None:
        if self._read_early(wait=0.0):
            return
        assert self._sock is not None
        self._sock.sendall(data)
        if body:
            self.sent += len(data)
            self._sent_metric.set(self.sent)

    def _read_early(self, *, wait: float) -> bool:
        """Whether the server answered (or closed) already: it refused the stream early.

        Checked before every send.  TLS 1.3 servers also send session tickets
        after the handshake: reading them yields no data, and is no answer.
        """
        sock = self._sock
        if self._answered:
            return True
        if sock is None:
            return False
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not select.select([sock], [], [], wait)[0]:
            return False
        sock.settimeout(0.0 if wait == 0 else wait)
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
            return False
        except ssl.SSLError as e:
            if _is_alert(e):
                raise _tls_error(e) from e
            return False
        except OSError:
            return False
        finally:
            sock.settimeout(self._timeout)
        self._answered = True
        self._early = data
        if data:
            log.info("ANSWER early, after %d bytes of the body", self.sent)
        return True

    def _response(self) -> None:
        assert self._sock is not None
        response = http.client.HTTPResponse(
            cast(socket.socket, _Response(self._early, self._sock)), method="POST")
        try:
            response.begin()
            text = response.read(MAX_ANSWER).decode("utf-8", "replace").strip()
        except ssl.SSLError as e:
            raise _tls_error(e) if _is_alert(e) else _connection_error(e, "reading the answer") \
                from e
        except (OSError, http.client.HTTPException) as e:
            raise _connection_error(e, "reading the answer") from e
        if response.status == 200:
            return
        if response.status == 503:  # busy: our previous, dropped attempt is still running
            raise Dropped(reason=f"the upload server answered 503: {text}")
        raise Refused(status=response.status, status_text=response.reason, text=text)


def _is_alert(e: ssl.SSLError) -> bool:
    return isinstance(e, ssl.SSLCertVerificationError) or "ALERT" in str(e.reason or "").upper()


def _tls_error(e: ssl.SSLError) -> CloneError:
    if isinstance(e, ssl.SSLCertVerificationError):
        return CloneError(reason=f"the upload server's certificate is not trusted: "
                                 f"{e.verify_message or e}")
    if _is_alert(e):
        return CloneError(reason=f"the upload server refused the TLS session ({e.reason}): "
                                 "is the client certificate (CLIENT_CERT_FILE) one it trusts?")
    return Dropped(reason=f"TLS: {e}")


def _connection_error(e: BaseException, doing: str) -> Dropped:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return Dropped(reason=f"the connection failed while {doing}: {text}")


class Percent:
    """CDI's clone progress counter: a percentage that only ever goes up."""

    def __init__(self, counter: prometheus_client.Counter) -> None:
        self._counter = counter
        self.value = 0.0

    def set_percent(self, percent: float) -> None:
        percent = min(percent, 100.0)
        if percent > self.value:
            self._counter.inc(percent - self.value)
            self.value = percent


