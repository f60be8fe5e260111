"""A real, misbehaving-on-demand HTTP/1.1 file server for importer tests.

:class:`FileServer` serves the files under a root directory from 127.0.0.1 on an
ephemeral port, in a background thread, over plain HTTP or TLS. Each path can be
told to misbehave with :meth:`FileServer.configure` (basic auth, no HEAD, no
ranges, redirects, cut or stalled bodies, fixed error statuses, chunked bodies,
content that changes after the first download). Every request is recorded in
:attr:`FileServer.requests`.

Bodies are streamed (``os.sendfile`` for plain connections, a 1 MiB buffer loop
over TLS or when chunking), so multi-hundred-MiB files are fine.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import os
import re
import secrets
import socket
import socketserver
import ssl
import sys
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from tests.support.tls import TLSFiles, server_ssl_context

CHUNK = 1024 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
HOST = "127.0.0.1"

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class PathConfig:
    """Behaviour of one path; see :meth:`FileServer.configure`."""

    auth: tuple[str, str] | None = None
    no_head: bool = False
    no_range: bool = False
    redirect_to: str | None = None
    cut_after: int | None = None
    cut_times: int = 1
    stall_after: int | None = None
    stall_seconds: float = 0.0
    stall_times: int = 1
    status: int | None = None
    content_type: str = DEFAULT_CONTENT_TYPE
    change_after_first_get: Path | None = None
    chunked: bool = False


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, and the status it answered."""

    method: str
    path: str  # the request target's path, still percent-encoded, without the query
    query: str
    headers: dict[str, str]  # lower-cased names
    status: int


@dataclass
class _PathState:
    config: PathConfig
    body_gets: int = 0  # GET responses that carried (part of) the file
    replacement: Path | None = None


@dataclass
class _Served:
    """What a GET/HEAD of an existing file is going to send."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    start: int = 0
    length: int = 0


class _RangeNotSatisfiable(Exception):
    pass


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Parse a single-range ``Range`` header against a file of ``size`` bytes.

    Returns the half-open ``(start, stop)``; ``None`` when the header must be ignored
    (garbage, several ranges, ``N-M`` with ``M < N``). Raises
    :class:`_RangeNotSatisfiable` when the range lies wholly past the end.
    """
    match = _RANGE_RE.match(value)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _RangeNotSatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _RangeNotSatisfiable
    stop = size if not last else min(int(last) + 1, size)
    return start, stop


def etag_for(st: os.stat_result) -> str:
    """The strong ETag the server sends for a file with this stat."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def _if_range_matches(value: str, etag: str, mtime: float) -> bool:
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # strong comparison; weak tags never match
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    if when.tzinfo is None:
        return False
    return int(when.timestamp()) == int(mtime)


def _hard_shutdown(sock: socket.socket) -> None:
    """Shut both directions of the TCP connection under ``sock`` (no TLS close_notify)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cdi-test-fileserver/1.0"
    timeout = 60.0
    server: _Server

    # --- plumbing -------------------------------------------------------------------

    def setup(self) -> None:
        # Handshake before StreamRequestHandler.setup() creates rfile/wfile, so that a
        # failed handshake leaves nothing half-open behind.
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded before anything reaches the client, so a test that got the response
        # always finds its record.
        raw_path = getattr(self, "path", "") or ""
        parts = urlsplit(raw_path)
        headers = getattr(self, "headers", None)
        recorded: dict[str, str] = {}
        if headers is not None:
            for name, value in headers.items():
                key = name.lower()
                recorded[key] = f"{recorded[key]}, {value}" if key in recorded else value
        self.server.owner._record(
            RequestRecord(
                method=getattr(self, "command", None) or "",
                path=parts.path,
                query=parts.query,
                headers=recorded,
                status=code,
            )
        )
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # --- responses ------------------------------------------------------------------

    def _relative_path(self) -> str:
        return unquote(urlsplit(self.path).path).lstrip("/")

    def _simple(
        self,
        status: int,
        head: bool,
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
        body = f"{status} {phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorized(self, auth: tuple[str, str]) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = f"{auth[0]}:{auth[1]}"
        return secrets.compare_digest(decoded.encode(), expected.encode())

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        rel = self._relative_path()
        state = owner._state(rel)
        config = state.config if state is not None else PathConfig()

        if config.auth is not None and not self._authorized(config.auth):
            self._simple(401, head, [("WWW-Authenticate", 'Basic realm="test"')])
            return
        if config.status is not None:
            self._simple(config.status, head)
            return
        if head and config.no_head:
            self._simple(405, head, [("Allow", "GET")])
            return
        if config.redirect_to is not None:
            self._simple(302, head, [("Location", config.redirect_to)])
            return

        source = owner._source_for(rel, state)
        if source is None:
            self._simple(404, head)
            return
        try:
            f = open(source, "rb")
        except OSError:
            self._simple(404, head)
            return
        with f:
            self._serve_file(f, config, state, head)

    def _plan(self, st: os.stat_result, config: PathConfig) -> _Served:
        size = st.st_size
        etag = etag_for(st)
        headers = [
            ("Content-Type", config.content_type),
            ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
            ("ETag", etag),
        ]
        if config.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            return _Served(200, headers, 0, size)
        if config.no_range:
            headers.append(("Content-Length", str(size)))
            return _Served(200, headers, 0, size)

        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", etag):
            return _Served(412, [])
        headers.append(("Accept-Ranges", "bytes"))
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        wanted: tuple[int, int] | None = None
        if range_header is not None and (
            if_range is None or _if_range_matches(if_range, etag, st.st_mtime)
        ):
            try:
                wanted = parse_range(range_header, size)
            except _RangeNotSatisfiable:
                return _Served(416, [("Content-Range", f"bytes */{size}")])
        if wanted is None:
            headers.append(("Content-Length", str(size)))
            return _Served(200, headers, 0, size)
        start, stop = wanted
        headers.append(("Content-Length", str(stop - start)))
        headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
        return _Served(206, headers, start, stop - start)

    def _serve_file(
        self, f: io.BufferedReader, config: PathConfig, state: _PathState | None, head: bool
    ) -> None:
        st = os.fstat(f.fileno())
        plan = self._plan(st, config)
        if plan.status in (412, 416):
            self._simple(plan.status, head, plan.headers)
            return

        limit: int | None = None
        stall = 0.0
        if not head and state is not None:
            limit, stall = self.server.owner._begin_body_get(state)

        self.send_response(plan.status)
        for name, value in plan.headers:
            self.send_header(name, value)
        self.end_headers()
        if head:
            return

        to_send = plan.length if limit is None else min(limit, plan.length)
        sent = self._send_body(f, plan.start, to_send, config.chunked)
        if limit is not None:
            if stall > 0:
                self.server.owner._stopping.wait(stall)
            self.close_connection = True
            _hard_shutdown(self.connection)
            return
        if sent < plan.length:  # the file shrank under us: the framing is broken
            self.close_connection = True
            _hard_shutdown(self.connection)
            return
        if config.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, f: io.BufferedReader, start: int, count: int, chunked: bool) -> int:
        if count <= 0:
            return 0
        conn = self.connection
        if not chunked and not isinstance(conn, ssl.SSLSocket):
            return int(conn.sendfile(f, offset=start, count=count))  # os.sendfile underneath
        buf = bytearray(min(CHUNK, count))
        view = memoryview(buf)
        f.seek(start)
        sent = 0
        while sent < count:
            n = f.readinto(view[: min(len(buf), count - sent)])
            if not n:
                break
            if chunked:
                conn.sendall(b"%x\r\n" % n)
                conn.sendall(view[:n])
                conn.sendall(b"\r\n")
            else:
                conn.sendall(view[:n])
            sent += n
        return sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: FileServer, context: ssl.SSLContext | None) -> None:
        self.owner = owner
        self._context = context
        self.connections: dict[threading.Thread, socket.socket] = {}
        super().__init__((HOST, 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls getfqdn(), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def server_activate(self) -> None:
        super().server_activate()
        if self._context is not None:
            # Handshakes happen in the connection threads (see _Handler.setup), so a
            # client that never speaks TLS cannot block accept().
            self.socket = self._context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._connection_thread,
            args=(request, client_address),
            name=f"FileServer-{self.server_port}-conn",
            daemon=True,
        )
        with self.owner._lock:
            self.connections[thread] = request
        thread.start()

    def _connection_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.owner._lock:
                self.connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # disconnects, resets, TLS failures, timeouts
            return
        self.owner._errors.append(traceback.format_exc())


class FileServer:
    """Serve ``root`` over HTTP/1.1 (or HTTPS when ``tls`` is given) on 127.0.0.1:0.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Files are looked up
    under ``root`` at request time, so tests may add files at any point.
    """

    def __init__(self, root: Path, tls: TLSFiles | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self._lock = threading.Lock()
        self._paths: dict[str, _PathState] = {}
        self._records: list[RequestRecord] = []
        self._errors: list[str] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> FileServer:
        if self._server is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        context = server_ssl_context(self.tls) if self.tls is not None else None
        server = _Server(self, context)
        self._server = server
        self._port = server.server_port
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"FileServer-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop open connections (also idle keep-alive ones and stalled
        responses), join every thread and close the listening socket. Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        thread.join()
        with self._lock:
            connections = dict(server.connections)
        for sock in connections.values():
            _hard_shutdown(sock)
        for conn_thread in connections:
            conn_thread.join(timeout=10)
        server.server_close()
        self._server = None
        self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def url(self, path: str = "") -> str:
        """``http(s)://127.0.0.1:<port>/<path>`` (``path`` is percent-encoded where needed)."""
        return f"{self.base_url}/{quote(path.lstrip('/'), safe='/?&=%:@')}"

    # --- content and behaviour ------------------------------------------------------

    def put_file(self, path: str, data: bytes) -> Path:
        """Write ``data`` to ``root/path`` (parents created) and return that path."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def configure(
        self,
        path: str,
        *,
        auth: tuple[str, str] | None = None,
        no_head: bool = False,
        no_range: bool = False,
        redirect_to: str | None = None,
        cut_after: int | None = None,
        cut_times: int = 1,
        stall_after: int | None = None,
        stall_seconds: float = 0.0,
        stall_times: int = 1,
        status: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        change_after_first_get: Path | None = None,
        chunked: bool = False,
    ) -> None:
        """Set how ``path`` (relative to the root, e.g. ``"disk.qcow2"``) behaves.

        Replaces any earlier configuration of ``path`` and resets its GET counter;
        ``configure(path)`` with no options restores the default behaviour. The path
        need not exist (useful with ``redirect_to`` and ``status``). Checks run in this
        order: ``auth`` (401), ``status``, ``no_head`` (405 to HEAD), ``redirect_to``
        (302), then the file (404 if missing).

        ``cut_after``/``cut_times``: the first ``cut_times`` GETs that send the file get
        full headers but only ``cut_after`` body bytes, then the TCP connection is shut
        down. ``stall_after``/``stall_seconds``/``stall_times``: the same, but waiting
        ``stall_seconds`` (cut short by :meth:`stop`) before shutting down. When both
        apply to a response, the smaller byte count wins and the stall happens only if
        it is the stall's. ``change_after_first_get``: from the first GET that sends
        the file onwards (that GET still sends the old content), the path serves this
        other file instead. ``chunked``: ``Transfer-Encoding: chunked``, no
        Content-Length, no ranges.
        """
        if cut_after is not None and cut_after < 0:
            raise ValueError("cut_after must be >= 0")
        if stall_after is not None and stall_after < 0:
            raise ValueError("stall_after must be >= 0")
        if cut_times < 0 or stall_times < 0 or stall_seconds < 0:
            raise ValueError("counts and durations must be >= 0")
        config = PathConfig(
            auth=auth,
            no_head=no_head,
            no_range=no_range,
            redirect_to=redirect_to,
            cut_after=cut_after,
            cut_times=cut_times,
            stall_after=stall_after,
            stall_seconds=stall_seconds,
            stall_times=stall_times,
            status=status,
            content_type=content_type,
            change_after_first_get=(
                Path(change_after_first_get) if change_after_first_get is not None else None
            ),
            chunked=chunked,
        )
        with self._lock:
            self._paths[path.lstrip("/")] = _PathState(config)

    # --- observation ----------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request answered so far, oldest first."""
        with self._lock:
            return list(self._records)

    def requests_for(self, path: str, method: str | None = None) -> list[RequestRecord]:
        """Records whose decoded path is ``path`` (leading ``/`` optional)."""
        wanted = path.lstrip("/")
        return [
            r
            for r in self.requests
            if unquote(r.path).lstrip("/") == wanted and (method is None or r.method == method)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions in handler threads (bugs in this server)."""
        with self._lock:
            return list(self._errors)

    # --- used by the handler --------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _state(self, rel: str) -> _PathState | None:
        with self._lock:
            return self._paths.get(rel)

    def _source_for(self, rel: str, state: _PathState | None) -> Path | None:
        with self._lock:
            replacement = state.replacement if state is not None else None
        if replacement is not None:
            return replacement
        if not rel or "\x00" in rel:
            return None
        try:
            root = self.root.resolve(strict=True)
            candidate = (root / rel).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate

    def _begin_body_get(self, state: _PathState) -> tuple[int | None, float]:
        """Count a GET that sends the file; return (byte limit or None, stall seconds)."""
        with self._lock:
            state.body_gets += 1
            n = state.body_gets
            config = state.config
            if n == 1 and config.change_after_first_get is not None:
                state.replacement = config.change_after_first_get
        limits: list[tuple[int, float]] = []
        if config.cut_after is not None and n <= config.cut_times:
            limits.append((config.cut_after, 0.0))
        if config.stall_after is not None and n <= config.stall_times:
            limits.append((config.stall_after, config.stall_seconds))
        if not limits:
            return None, 0.0
        return min(limits, key=lambda item: (item[0], -item[1]))
