"""A TCP relay that drops connections mid-response, for testing resumed downloads.

Servers we do not write (moto's S3) cannot be told to fail halfway through a
body, so the client is pointed at this relay instead: it forwards each
connection to the backend on 127.0.0.1 and cuts the first ``cut_times``
connections whose response passes ``cut_after`` bytes (headers included).
``mode`` says how: ``close``, an orderly close, so the client receives exactly
those bytes and then a short body; ``reset``, a TCP reset, which may also
discard what the client had not read yet; ``stall``, nothing more is sent and
the connection stays open, until the client gives up waiting.  It also keeps
the head of every request it forwarded (request line and headers, lower-case
names), so a test can check what the client asked for: a ``range`` on the
retry, no ``authorization`` on an anonymous request.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from typing import Literal

_CHUNK = 64 * 1024
STALL_SECONDS = 60  # how long a stalled connection stays open (or until stop())
Mode = Literal["close", "reset", "stall"]


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


def _parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(method, path, headers)


def _close(sock: socket.socket) -> None:
    """An orderly end (FIN): the client reads every byte sent, then a short body."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _hard_close(sock: socket.socket) -> None:
    """Close with a TCP reset, like a dropped connection, not an orderly end.

    SHUT_RD first wakes the other pump thread blocked in recv on this socket: the
    kernel keeps a socket that a thread is still reading open past close().
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class Cutter:
    """Relay 127.0.0.1:<port> -> 127.0.0.1:<backend_port>, cutting responses on request."""

    def __init__(self, backend_port: int, *, cut_after: int = 0, cut_times: int = 0,
                 mode: Mode = "close") -> None:
        self.backend_port = backend_port
        self.cut_after = cut_after
        self.mode = mode
        self._stopping = threading.Event()
        self._cuts_left = cut_times
        self.cuts = 0  # connections cut so far
        # Called after the bytes before a cut were sent and before the connection is
        # reset, e.g. to change the object while the client is cut off.
        self.on_cut: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def start(self) -> Cutter:
        self._spawn(self._accept_loop, "cutter-accept")
        return self

    def stop(self) -> None:
        self._closed = True
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()

    def __enter__(self) -> Cutter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=10)
            except OSError:
                _hard_close(client)
                continue
            backend.settimeout(None)
            with self._lock:
                self._sockets.update((client, backend))
            self._spawn(self._requests_pump, "cutter-up", client, backend)
            self._spawn(self._responses_pump, "cutter-down", backend, client)

    def _requests_pump(self, client: socket.socket, backend: socket.socket) -> None:
        """Client -> backend, recording each request head (bodies are passed through)."""
        pending = b""
        body_left = 0
        try:
            while data := client.recv(_CHUNK):
                backend.sendall(data)
                pending += data
                while True:
                    if body_left:
                        skip = min(body_left, len(pending))
                        pending, body_left = pending[skip:], body_left - skip
                        if body_left:
                            break
                    head, sep, rest = pending.partition(b"\r\n\r\n")
                    if not sep:
                        break
                    request = _parse_head(head)
                    with self._lock:
                        self._requests.append(request)
                    pending = rest
                    body_left = int(request.headers.get("content-length", "0") or 0)
            backend.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cuts_left <= 0:
                return False
            self._cuts_left -= 1
            return True

    def _responses_pump(self, backend: socket.socket, client: socket.socket) -> None:
        """Backend -> client, resetting the connection after cut_after bytes if a cut is due."""
        sent = 0
        try:
            while data := backend.recv(_CHUNK):
                if sent + len(data) >= self.cut_after and self._take_cut():
                    client.sendall(data[: self.cut_after - sent])
                    if self.on_cut is not None:
                        self.on_cut()
                    with self._lock:
                        self.cuts += 1
                        self._sockets.discard(client)
                        self._sockets.discard(backend)
                    if self.mode == "stall":
                        self._stopping.wait(STALL_SECONDS)
                    if self.mode == "reset":
                        _hard_close(client)
                    else:
                        _close(client)
                    backend.close()
                    return
                client.sendall(data)
                sent += len(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
