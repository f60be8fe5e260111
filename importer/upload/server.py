"""The upload server's HTTP side: routes, request framing, TLS, and the serve loop.

A stdlib ``ThreadingHTTPServer``: one thread per connection, and the TLS
handshake runs in that thread, not in the accept loop, so a slow client cannot
hold up others (a second upload must be able to get its 503).  Requests are
framed here (Content-Length or chunked, ``?offset``, ``X-Checksum``, the form
boundary) and handed to ``uploads.Uploads``, which decides and answers.

With ``LISTEN_SOCKET`` a second listener, on a Unix socket, serves the same
routes in plain HTTP to clients of our own user (``localsocket`` says why that
is safe); both listeners share one ``Uploads``, so one upload at a time holds
across them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import re
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
from typing import Any

import prometheus_client

from importer import errors, settings
from importer import progress as progress_mod
from importer.progress import Progress
from importer.upload import body as body_mod
from importer.upload import clone, localsocket, sparse
from importer.upload.config import UploadConfig
from importer.upload.uploads import DRAIN_LIMIT, HTTPError, Kind, Request, Route, Uploads

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 600.0  # seconds a connection may send nothing before it is dropped
HANDSHAKE_TIMEOUT = 30.0
# Lingering close: after the answer, what the client still sends is read and dropped until
# it closes, is quiet for CLOSE_LINGER_IDLE seconds, or CLOSE_LINGER_SECONDS have passed.
CLOSE_LINGER_SECONDS = 5.0
CLOSE_LINGER_IDLE = 1.0
OFFSET_PATH = "/v1beta1/upload-offset"

_KINDS: tuple[tuple[str, Kind], ...] = (
    ("upload", "raw"), ("upload-form", "form"), ("upload-archive", "archive"))
ROUTES: dict[str, Route] = {
    f"/{version}/{name}{suffix}": Route(kind, suffix == "-async")
    for version in ("v1beta1", "v1alpha1")
    for name, kind in _KINDS
    for suffix in ("", "-async")
}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cdi-uploadserver"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: UploadServer | LocalUploadServer

    def setup(self) -> None:
        super().setup()
        self._replied = False

    def parse_request(self) -> bool:
        self._replied = False  # once per request: GETs and HEADs may share a connection
        return super().parse_request()

    def version_string(self) -> str:
        return self.server_version

    def address_string(self) -> str:
        return "local" if self.server.local else str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        log.info("HTTP client=%s %s", self.address_string(), format % args)

    def _reply(self, status: int, text: str = "", *, payload: dict[str, Any] | None = None,
               content_type: str = "text/plain; charset=utf-8",
               headers: dict[str, str] | None = None) -> None:
        if self._replied:
            return
        self._replied = True
        data = text.encode()
        if payload is not None:
            data, content_type = json.dumps(payload).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and data:
                self.wfile.write(data)
            self.wfile.flush()
        except OSError as e:
            log.info("REPLY status=%d not delivered: %s", status, e)

    def _check_client(self) -> None:
        """With CLIENT_NAME, the verified client certificate must name it (CN or DNS SAN)."""
        name = self.server.config.client_name
        if name is None or self.server.local:  # local: the peer's uid was checked on accept
            return
        cert = getattr(self.connection, "getpeercert", lambda: None)() or {}
        names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
        names |= {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
        if name not in names:
            raise HTTPError(401, f"client certificate is not issued to {name}")

    def _client_allowed(self) -> bool:
        try:
            self._check_client()
        except HTTPError as e:
            self.close_connection = True
            self._reply(e.status, e.text)
            return False
        return True

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/healthz":
            self._reply(200, "OK")
        elif path == OFFSET_PATH:
            if self._client_allowed():
                self._reply(200, payload=self.server.uploads.status())
        elif path == "/metrics":
            if self._client_allowed():
                data = prometheus_client.generate_latest(self.server.progress.registry)
                self._reply(200, data.decode(), content_type=prometheus_client.CONTENT_TYPE_LATEST)
        elif path in ROUTES:
            self._reply(405, "Method Not Allowed")
        else:
            self._reply(404, "404 page not found")

    def do_HEAD(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        route = ROUTES.get(path)
        if path == "/healthz" or (route is not None and route.asynchronous):
            if path == "/healthz" or self._client_allowed():
                # What a POST may carry besides a plain image: a client that sees
                # the sparse stream here sends a raw image's data only.
                accept = None if path == "/healthz" or self.server.config.clone else {
                    "Accept-Post": f"application/octet-stream, {sparse.MEDIA_TYPE}"}
                self._reply(200, headers=accept)
        else:
            self._reply(404)

    def handle_expect_100(self) -> bool:
        """Refuse a busy or finished server before the client sends its body."""
        if self.command == "POST" and urllib.parse.urlsplit(self.path).path in ROUTES:
            try:
                self.server.uploads.check()
            except HTTPError as e:
                self.close_connection = True
                self._reply(e.status, e.text)
                return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        self.close_connection = True  # an upload is one request per connection
        url = urllib.parse.urlsplit(self.path)
        try:
            framed, length = self._framing()
        except HTTPError as e:  # where the body ends is unknown: it cannot be skipped
            self._reply(e.status, e.text)
            return
        try:
            route = ROUTES.get(url.path)
            if route is None:
                raise HTTPError(404, "404 page not found")
            self._check_client()
            req = self._request(route, url.query, framed, length)
            self.server.uploads.run(req, self._reply)
        except HTTPError as e:  # refused before the body was read
            log.info("UPLOAD refused status=%d: %s", e.status, e.text)
            # Read (some of) the body first: a client still sending when the
            # connection closes may see a reset instead of the reply.
            framed.drain(DRAIN_LIMIT)
            self._reply(e.status, e.text, payload=e.payload)

    def _framing(self) -> tuple[body_mod.LengthBody | body_mod.ChunkedBody, int | None]:
        h = self.headers
        te = h.get("Transfer-Encoding", "").strip().lower()
        if te:
            if te.rsplit(",", 1)[-1].strip() != "chunked":
                raise HTTPError(501, f"Transfer-Encoding {te!r} is not supported")
            return body_mod.ChunkedBody(self.rfile), None
        if (cl := h.get("Content-Length")) is not None:
            if not re.fullmatch(r"\s*\d{1,19}\s*", cl):
                raise HTTPError(400, "bad Content-Length")
            return body_mod.LengthBody(self.rfile, int(cl)), int(cl)
        raise HTTPError(411, "Content-Length or chunked Transfer-Encoding required")

    def _request(self, route: Route, query: str,
                 framed: body_mod.LengthBody | body_mod.ChunkedBody,
                 length: int | None) -> Request:
        h = self.headers
        offset = None
        values = urllib.parse.parse_qs(query).get("offset")
        if values:
            if not re.fullmatch(r"\d{1,19}", values[0]):
                raise HTTPError(400, "offset must be a non-negative integer")
            offset = int(values[0])
            if offset and route.kind != "raw":
                raise HTTPError(400, "only the upload and upload-async endpoints can continue "
                                     "at an offset")
        clone_mode = self.server.config.clone
        why = clone.refusal(h.get(clone.HEADER), clone_mode=clone_mode,
                            sync_upload=route == Route("raw", False), offset=bool(values))
        if why is not None:
            raise HTTPError(400, why)
        if clone_mode:
            return Request(route=Route("clone", False), body=framed, length=length, offset=None,
                           checksum=None, boundary=b"")
        media_type = h.get("Content-Type", "").partition(";")[0].strip().lower()
        is_sparse = media_type == sparse.MEDIA_TYPE
        if is_sparse and route.kind != "raw":
            raise HTTPError(400, f"a {sparse.MEDIA_TYPE} body goes to /v1beta1/upload or "
                                 "/v1beta1/upload-async (it carries a raw disk image)")
        boundary = b""
        if route.kind == "form":
            try:
                boundary = body_mod.form_boundary(h.get("Content-Type", ""))
            except body_mod.MalformedBody as e:
                raise HTTPError(400, str(e)) from e
        return Request(route=route, body=framed, length=length, offset=offset,
                       checksum=parse_checksum(h.get("X-Checksum")), boundary=boundary,
                       sparse=is_sparse)


def parse_checksum(value: str | None) -> settings.Checksum | None:
    """``X-Checksum: <md5|sha1|sha256|sha512>:<hex>``; a bad value is a 400."""
    if value is None:
        return None
    algorithm, _, digest = value.strip().partition(":")
    algorithm, digest = algorithm.lower(), digest.strip().lower()
    size = settings.CHECKSUM_LENGTHS.get(algorithm)
    if size is None or len(digest) != size or not re.fullmatch(r"[0-9a-f]+", digest):
        raise HTTPError(400, "X-Checksum must be <md5|sha1|sha256|sha512>:<hex digest>")
    return settings.Checksum(algorithm, digest)


class UploadServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16
    local = False

    def __init__(self, config: UploadConfig, uploads: Uploads, progress: Progress) -> None:
        self.config = config
        self.uploads = uploads
        self.progress = progress
        self._context = config.ssl_context()
        host = config.listen_host.strip("[]")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, config.listen_port), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (a DNS lookup); not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def address(self) -> str:
        host = str(self.server_address[0])
        return f"[{host}]:{self.server_port}" if ":" in host else f"{host}:{self.server_port}"

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self._context is not None:
            # The handshake happens in the connection's thread (finish_request).
            sock = self._context.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(HANDSHAKE_TIMEOUT)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as e:
                log.warning("TLS handshake failed client=%s: %s", client_address[0], e)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP handler failed client=%s", client_address[0])

    def shutdown_request(self, request: Any) -> None:
        """End the connection without resetting it under a client that is still sending.

        A refused upload is answered after at most DRAIN_LIMIT bytes of its body were
        read.  Closing a socket with unread data sends a TCP reset, and a client still
        writing its body (the upload proxy, whose event loop gives up on the connection
        at the first failed write) then loses the answer: it sees a reset, the proxy a
        502, instead of the 400 or 503.  So, like Go's net/http and nginx, close in two
        steps: end our side (FIN), then read and drop what the client still sends until
        it closes (a client that got the answer stops), is quiet for CLOSE_LINGER_IDLE
        seconds, or CLOSE_LINGER_SECONDS have passed.
        """
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone (or never connected)
        else:
            _linger(request)
        self.close_request(request)


class LocalUploadServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same routes on a Unix socket (``LISTEN_SOCKET``), plain HTTP, for our user only.

    The socket file is 0600 in a 0700 directory (checked with the settings),
    and every connection's peer must run as our user (``SO_PEERCRED``).
    """

    daemon_threads = True
    request_queue_size = 16
    local = True

    def __init__(self, config: UploadConfig, uploads: Uploads, progress: Progress) -> None:
        assert config.listen_socket is not None
        self.config = config
        self.uploads = uploads
        self.progress = progress
        self.path = config.listen_socket
        super().__init__(str(self.path), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = localsocket.bind(self.path)
        self._inode = self.path.lstat().st_ino  # to remove our socket, not a successor's
        self.server_address = str(self.path)
        try:
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if localsocket.trusted_peer(request):
            return True
        log.warning("REFUSED local connection of uid %d: not our user",
                    localsocket.peer_uid(request))
        request.close()  # at once: no lingering close for a stranger, in the accept thread
        return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP handler failed client=local")

    shutdown_request = UploadServer.shutdown_request

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            if self.path.lstat().st_ino == self._inode:
                self.path.unlink()


def _linger(sock: socket.socket) -> None:
    """Read and drop what the peer sends until it closes, goes quiet, or time is up."""
    buf = bytearray(64 * 1024)
    deadline = time.monotonic() + CLOSE_LINGER_SECONDS
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(min(left, CLOSE_LINGER_IDLE))
            if not sock.recv_into(buf):
                return
    except OSError:  # quiet (timeout), reset, or closed
        return


def serve(config: UploadConfig) -> tuple[int, str]:
    """Run the server until the upload completes or the deadline passes: (exit code, message)."""
    progress = Progress(config.importer.owner_uid)
    metrics = None
    if config.importer.metrics_address:
        metrics = progress_mod.serve(progress, config.importer.metrics_address,
                                     config.importer.metrics_address_file)
    uploads = Uploads(config, progress)
    try:
        server = UploadServer(config, uploads, progress)
    except OSError as e:
        raise errors.SettingsError(variable="LISTEN_ADDRESS",
                                   reason=f"cannot listen on {config.listen_host}:"
                                          f"{config.listen_port}: {e.strerror or e}") from e
    servers: list[UploadServer | LocalUploadServer] = [server]
    if config.listen_socket is not None:
        try:
            servers.append(LocalUploadServer(config, uploads, progress))
        except OSError as e:
            server.server_close()
            raise errors.SettingsError(variable="LISTEN_SOCKET",
                                       reason=f"cannot listen on {config.listen_socket}: "
                                              f"{e.strerror or e}") from e
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1},
                         name="upload-accept-local" if s.local else "upload-accept",
                         daemon=True).start()
    log.info("LISTEN address=%s socket=%s tls=%s mtls=%s deadline=%s resume=%s clone=%s",
             server.address, config.listen_socket or "none", config.tls,
             config.client_ca is not None,
             config.deadline.isoformat() if config.deadline else "none",
             config.resume_state_file or "off", config.clone)
    if config.address_file is not None:
        tmp = config.address_file.with_name(config.address_file.name + ".tmp")
        tmp.write_text(server.address + "\n")
        tmp.replace(config.address_file)  # a reader never sees half an address
    try:
        code, message = uploads.wait(config.deadline)
        if code == 0 and config.linger:
            time.sleep(config.linger)
    finally:
        # Each accept loop notices the request within its poll interval: stop them at once.
        stoppers = [threading.Thread(target=s.shutdown, name="upload-stop") for s in servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for s in servers:
            s.server_close()
        if metrics is not None:
            metrics.server_close()
    return code, message
