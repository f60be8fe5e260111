"""A real HTTP(S) server whose validators are chosen per test, for polling HTTP sources.

``FileServer`` (``httpserver``) always sends both ``ETag`` and ``Last-Modified``
and ignores ``If-None-Match``/``If-Modified-Since``.  A DataImportCron's HTTP
poll needs servers that send a strong ETag, only Last-Modified, only a weak
ETag, or neither, and that answer conditional requests as RFC 9110 says:
:class:`VersionedServer` serves the files under a root directory that way,
on 127.0.0.1:0 in a thread, with optional basic auth, TLS and HEAD refusal.
The ETag is derived from the content, Last-Modified from the file's mtime.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import secrets
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from tests.support.tls import TLSFiles, server_ssl_context

Validators = Literal["etag", "last-modified", "both", "weak", "neither"]
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    status: int


def etag_of(path: Path) -> str:
    return '"' + hashlib.sha256(path.read_bytes()).hexdigest()[:20] + '"'


def last_modified_of(path: Path) -> str:
    return email.utils.formatdate(int(path.stat().st_mtime), usegmt=True)


class VersionedServer:
    def __init__(self, root: Path, *, validators: Validators = "both", no_head: bool = False,
                 auth: tuple[str, str] | None = None, tls: TLSFiles | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.validators = validators
        self.no_head = no_head
        self.auth = auth
        self.tls = tls
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        # Called after each answered HEAD (tests replace the file between poll and import).
        self.on_head: Callable[[Request], None] | None = None
        self._server = _Server((HOST, 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = server_ssl_context(tls).wrap_socket(
                self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="versioned-server", daemon=True)

    def start(self) -> VersionedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def url(self, name: str) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{HOST}:{self._server.server_address[1]}/{name}"

    def requests(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if method is None or r.method == method]

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _headers(self, path: Path) -> list[tuple[str, str]]:
        out = []
        if self.validators in ("etag", "both"):
            out.append(("ETag", etag_of(path)))
        if self.validators == "weak":
            out.append(("ETag", "W/" + etag_of(path)))
        if self.validators in ("last-modified", "both"):
            out.append(("Last-Modified", last_modified_of(path)))
        return out

    def _status(self, method: str, headers: Any, path: Path | None) -> int:
        if self.auth is not None:
            expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            if not secrets.compare_digest(headers.get("Authorization", ""), f"Basic {expected}"):
                return 401
        if method == "HEAD" and self.no_head:
            return 405
        if path is None:
            return 404
        etag = etag_of(path) if self.validators in ("etag", "both") else None
        mtime = int(path.stat().st_mtime) if self.validators in ("last-modified", "both") \
            else None
        if_match = headers.get("If-Match")
        if if_match is not None and (etag is None or if_match.strip() not in (etag, "*")):
            return 412
        ius = headers.get("If-Unmodified-Since")
        if if_match is None and ius is not None and (mtime is None or mtime > _date(ius)):
            return 412
        inm = headers.get("If-None-Match")
        if inm is not None:
            return 304 if etag is not None and inm.strip() == etag else 200
        ims = headers.get("If-Modified-Since")
        if ims is not None and mtime is not None and mtime <= _date(ims):
            return 304
        return 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                rel = unquote(urlsplit(self.path).path).lstrip("/")
                candidate = owner.root / rel
                path = candidate if rel and ".." not in rel and candidate.is_file() else None
                status = owner._status(self.command, self.headers, path)
                request = Request(self.command, "/" + rel,
                                  {k.lower(): v for k, v in self.headers.items()}, status)
                owner._record(request)
                body = path.read_bytes() if status == 200 and path is not None else b""
                self.send_response(status)
                if path is not None and status in (200, 304):
                    for name, value in owner._headers(path):
                        self.send_header(name, value)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                if status != 304:
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not head and body:
                    try:
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                        self.close_connection = True
                if head and owner.on_head is not None:
                    self.wfile.flush()
                    owner.on_head(request)

        return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is no error
            super().handle_error(request, client_address)


def _date(text: str) -> int:
    try:
        return int(email.utils.parsedate_to_datetime(text).timestamp())
    except (TypeError, ValueError):
        return -1
