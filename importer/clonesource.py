"""``python -m importer.clonesource`` / ``cdi-clone-source``: send one volume to a clone target.

The source half of a host-assisted clone.  KubeVirt CDI's source pod sends a
tar of the whole source filesystem (or every byte of the block device),
snappy-compressed, zeros included.  This worker sends only data: it asks the
filesystem where the source's data is (``lseek`` ``SEEK_DATA``/``SEEK_HOLE``;
a block device, or a filesystem without them, is one extent), skips all-zero
64 KiB blocks inside the data as it reads (a preallocated image, a block
device), and streams what is left as offset-tagged frames to the target's
upload server in clone mode, which recreates the holes.  The wire format is in
``importer.upload.sparse`` and ``docs/clone.md``.

Environment
-----------
=================================  ===========================================================
``UPLOAD_URL``                     the target's upload endpoint, ``https://host:port/v1beta1/
                                   upload`` (plain ``http://`` only to a loopback address)
``UPLOAD_SOCKET``                  instead, the target's Unix socket on this machine (its
                                   ``LISTEN_SOCKET``): plain HTTP, no TLS, in a 0700
                                   directory of our own user (``importer.upload.localsocket``);
                                   ``UPLOAD_URL`` is then optional and only its path is used,
                                   and the certificate variables are not read
``IMPORTER_BLOCK_PATH``            source block volume; if it exists it is the source
                                   (``/dev/cdi-block-volume``)
``CLONE_SOURCE_DIR``               otherwise the source is ``<dir>/disk.img``
                                   (``/var/run/cdi/clone/source``)
``CLIENT_CERT_FILE``,              our client certificate (chain) and key, PEM, for mutual TLS;
``CLIENT_KEY_FILE``                both or neither
``SERVER_CA_FILE``                 CA bundle the upload server's certificate must verify
                                   against (default: the system's); the host name is checked
``OWNER_UID``                      label of the progress metrics (``""``)
``IMPORTER_METRICS_ADDRESS``,      metrics endpoint, as for the import worker (``:8443``;
``IMPORTER_METRICS_ADDRESS_FILE``  ``""`` disables; port 0 picks one, written to the file)
``IMPORTER_TERMINATION_LOG``       where the termination message goes (``/dev/termination-log``)
``IMPORTER_RETRIES``               new attempts after a dropped connection (``5``)
``IMPORTER_RETRY_BACKOFF``         first delay between attempts, doubled each time, at most
                                   30 s (``1``)
``IMPORTER_STALL_TIMEOUT``         seconds without progress on the connection before it is
                                   given up (and retried) (``600``)
=================================  ===========================================================

Metrics: ``kubevirt_cdi_clone_progress_total{ownerUID}`` (CDI's counter: percent
of the source's allocated bytes read and sent or skipped as zeros),
``kubevirt_cdi_clone_bytes_sent`` (request body bytes of this attempt) and
``kubevirt_cdi_clone_bytes_expected`` (allocated bytes), next to the import
worker's phase and byte metrics (bytes read = source bytes read).

An attempt that fails on the connection (refused, reset, cut, stalled, or 503
because the server is still busy with our previous, dropped attempt) is made
again from byte 0, up to ``IMPORTER_RETRIES`` times; the target starts again
from 0 too.  Any other answer than 200 ends the clone: its text is in the
termination message.  A source that cannot be read, an untrusted server
certificate, or a TLS handshake the server refuses are not retried.

Exit codes and termination message
----------------------------------
0: ``{"message": "Clone Complete", "virtualSize": N, "allocatedBytes": N,
"bytesSent": N, "attempts": N}`` (``bytesSent``: the successful attempt's
request body, framing included).  1: ``Unable to clone data: <reason>``
(``the upload server answered 400 Bad Request: <its text>`` for a refusal), or
``Invalid settings: <VARIABLE>: <reason>``.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, cast

import prometheus_client

from importer import errors, settings, units
from importer.__main__ import write_termination
from importer.progress import Progress
from importer.progress import serve as serve_metrics
from importer.upload import clone, localsocket, sparse

log = logging.getLogger("importer.clonesource")

DEFAULT_SOURCE_DIR = Path("/var/run/cdi/clone/source")
CHUNK = 4 * units.MiB  # bytes read from the source at a time; the largest frame
ROOM = 64  # bytes kept free before a frame's data for the chunk and frame header
MAX_BACKOFF = 30.0
MAX_ANSWER = 4096  # characters of a refusal kept for the termination message
BUFFERS = 3  # read ahead of the sender
READER_JOIN_TIMEOUT = 5.0
# Variables of the import worker that mean nothing here.
_IMPORT_ONLY = ("IMPORTER_SOURCE", "IMPORTER_ENDPOINT", "IMPORTER_CONTENTTYPE",
                "IMPORTER_CHECKSUM", "IMPORTER_IMAGE_SIZE")
_SAFE_PATH = re.compile(r"^/[!-~]*$")  # printable, no spaces: goes into the request line


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


@dataclasses.dataclass(frozen=True)
class Config:
    importer: settings.Settings  # block path, OWNER_UID, metrics, termination log, retries
    source_dir: Path
    url: str
    host: str
    port: int
    path: str  # path and query, for the request line
    tls: bool
    client_cert: Path | None
    client_key: Path | None
    server_ca: Path | None
    socket: Path | None = None  # UPLOAD_SOCKET: a local Unix socket instead of host:port

    @property
    def target(self) -> str:
        """Where the stream goes, for messages."""
        return f"unix:{self.socket}" if self.socket is not None else f"{self.host}:{self.port}"

    @property
    def source(self) -> Path:
        s = self.importer
        return s.block_path if s.is_block else self.source_dir / "disk.img"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(
                cafile=str(self.server_ca) if self.server_ca is not None else None)
        except (OSError, ssl.SSLError) as e:
            raise errors.SettingsError(variable="SERVER_CA_FILE",
                                       reason=f"cannot load the CA bundle: {e}") from e
        if self.client_cert is not None:
            try:
                ctx.load_cert_chain(certfile=self.client_cert, keyfile=self.client_key)
            except (OSError, ssl.SSLError) as e:
                raise errors.SettingsError(
                    variable="CLIENT_CERT_FILE",
                    reason=f"cannot load the certificate and key: {e}") from e
        return ctx


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read every variable of the contract; raise SettingsError on the first bad one."""
    e = os.environ if env is None else env

    def get(name: str) -> str | None:
        value = e.get(name)
        return value if value not in (None, "") else None

    base = {k: v for k, v in e.items() if k not in _IMPORT_ONLY}
    base["IMPORTER_SOURCE"] = "none"
    imp = settings.from_env(base)
    raw_url = get("UPLOAD_URL")
    if (sock := get("UPLOAD_SOCKET")) is not None:
        return _local_config(imp, localsocket.check_path("UPLOAD_SOCKET", sock), raw_url,
                             get("CLONE_SOURCE_DIR"))
    if raw_url is None:
        raise errors.SettingsError(variable="UPLOAD_URL",
                                   reason="the clone target's upload URL is required")
    try:
        url = urllib.parse.urlsplit(raw_url)
        port = url.port
    except ValueError as err:
        raise errors.SettingsError(variable="UPLOAD_URL", reason=str(err)) from err
    host = url.hostname or ""
    path = url.path or "/v1beta1/upload"
    if url.query:
        path += "?" + url.query
    if url.scheme not in ("http", "https") or not host or not _SAFE_PATH.match(path):
        raise errors.SettingsError(variable="UPLOAD_URL",
                                   reason=f"{raw_url!r} is not an https://host[:port]/path URL")
    if url.scheme == "http" and not settings.is_loopback(host):
        raise errors.SettingsError(variable="UPLOAD_URL",
                                   reason="refusing to send a volume over plain HTTP "
                                          "beyond loopback: use https://")
    cert, key = _file("CLIENT_CERT_FILE", get("CLIENT_CERT_FILE")), _file(
        "CLIENT_KEY_FILE", get("CLIENT_KEY_FILE"))
    if (cert is None) != (key is None):
        missing = "CLIENT_KEY_FILE" if key is None else "CLIENT_CERT_FILE"
        raise errors.SettingsError(
            variable=missing, reason="a client certificate needs CLIENT_CERT_FILE and "
                                     "CLIENT_KEY_FILE")
    tls = url.scheme == "https"
    config = Config(
        importer=imp,
        source_dir=Path(get("CLONE_SOURCE_DIR") or DEFAULT_SOURCE_DIR),
        url=raw_url,
        host=host,
        port=port or (443 if tls else 80),
        path=path,
        tls=tls,
        client_cert=cert,
        client_key=key,
        server_ca=_file("SERVER_CA_FILE", get("SERVER_CA_FILE")),
    )
    config.ssl_context()  # a certificate that does not load fails now, naming its variable
    return config


def _local_config(imp: settings.Settings, sock: Path, raw_url: str | None,
                  source_dir: str | None) -> Config:
    """UPLOAD_SOCKET: plain HTTP to a Unix socket of our own user; the URL gives the path."""
    path = "/v1beta1/upload"
    if raw_url is not None:
        try:
            url = urllib.parse.urlsplit(raw_url)
        except ValueError as err:
            raise errors.SettingsError(variable="UPLOAD_URL", reason=str(err)) from err
        path = (url.path or path) + (f"?{url.query}" if url.query else "")
        if not _SAFE_PATH.match(path):
            raise errors.SettingsError(variable="UPLOAD_URL",
                                       reason=f"{raw_url!r} has no usable path")
    return Config(importer=imp, source_dir=Path(source_dir or DEFAULT_SOURCE_DIR),
                  url=f"unix:{sock}{path}", host="localhost", port=0, path=path, tls=False,
                  client_cert=None, client_key=None, server_ca=None, socket=sock)


def _file(name: str, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_file():
        raise errors.SettingsError(variable=name, reason=f"{value} is not a file")
    return p


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

    def run(self, fd: int, size: int, allocated: int, percent: _Percent) -> None:
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

    def _exchange(self, fd: int, size: int, allocated: int, percent: _Percent) -> None:
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

    def _frames(self, fd: int, size: int, allocated: int, percent: _Percent) -> None:
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


class _Percent:
    """CDI's clone progress counter: a percentage that only ever goes up."""

    def __init__(self, counter: prometheus_client.Counter) -> None:
        self._counter = counter
        self.value = 0.0

    def set_percent(self, percent: float) -> None:
        percent = min(percent, 100.0)
        if percent > self.value:
            self._counter.inc(percent - self.value)
            self.value = percent


# --- the worker -----------------------------------------------------------------------


def run(config: Config) -> tuple[int, str]:
    """Send the source to the target, retrying dropped attempts: (exit code, message)."""
    s = config.importer
    started = time.monotonic()
    progress = Progress(s.owner_uid)
    labels = {"ownerUID": s.owner_uid}
    percent = _Percent(prometheus_client.Counter(
        "kubevirt_cdi_clone_progress", "Clone progress in percent (0-100)", ["ownerUID"],
        registry=progress.registry).labels(**labels))
    sent_metric = prometheus_client.Gauge(
        "kubevirt_cdi_clone_bytes_sent", "Request body bytes sent to the clone target in this "
        "attempt", ["ownerUID"], registry=progress.registry).labels(**labels)
    expected = prometheus_client.Gauge(
        "kubevirt_cdi_clone_bytes_expected", "Allocated bytes of the clone source",
        ["ownerUID"], registry=progress.registry).labels(**labels)
    metrics = None
    try:
        if s.metrics_address:
            metrics = serve_metrics(progress, s.metrics_address, s.metrics_address_file)
        ctx = config.ssl_context()
        path = config.source
        if not path.exists():
            raise CloneError(reason=f"no source volume: neither the block device {s.block_path} "
                                    f"nor {config.source_dir / 'disk.img'} exists")
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            count, allocated = 0, 0
            for _, length in sparse.extents(fd, size):
                count += 1
                allocated += length
            log.info("CLONE source=%s block=%s size=%d allocated=%d extents=%d target=%s",
                     path, s.is_block, size, allocated, count, config.url)
            progress.set_total(allocated)
            expected.set(allocated)
            progress.set_phase("transfer")
            attempts, sent = _attempts(config, ctx, fd, size, allocated, progress, percent,
                                       sent_metric)
        finally:
            os.close(fd)
        percent.set_percent(100.0)
        progress.set_phase("complete")
    except errors.SettingsError as e:
        log.error("SETTINGS %s", e)
        return 1, f"Invalid settings: {e}"
    except errors.Error as e:
        log.error("FAILED %s", e.termination_message())
        return 1, e.termination_message()
    except Exception as e:
        log.exception("FAILED unexpected error")
        return 1, f"Unable to clone data: {type(e).__name__}: {e}"
    finally:
        if metrics is not None:
            metrics.server_close()
    elapsed = time.monotonic() - started
    log.info("COMPLETE seconds=%.2f sent=%s allocated=%s attempts=%d", elapsed,
             units.humanize(sent), units.humanize(allocated), attempts)
    return 0, json.dumps({"message": "Clone Complete", "virtualSize": size,
                          "allocatedBytes": allocated, "bytesSent": sent,
                          "attempts": attempts})


def _attempts(config: Config, ctx: ssl.SSLContext | None, fd: int, size: int, allocated: int,
              progress: Progress, percent: _Percent,
              sent_metric: prometheus_client.Gauge) -> tuple[int, int]:
    """Make attempts until one succeeds: (attempts made, body bytes of the last)."""
    s = config.importer
    delay = s.retry_backoff
    attempt = 0
    while True:
        attempt += 1
        progress.restart()
        sent_metric.set(0)
        a = Attempt(config, ctx, progress, sent_metric)
        try:
            a.run(fd, size, allocated, percent)
            return attempt, a.sent
        except Dropped as e:
            if attempt > s.retries:
                raise CloneError(reason=f"sending to {config.url} failed after {attempt} "
                                        f"attempts: {e}") from e
            log.warning("RETRY attempt=%d failed after %d bytes, again in %.2f s: %s", attempt,
                        a.sent, delay, e)
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    termination_log = Path(os.environ.get("IMPORTER_TERMINATION_LOG") or "/dev/termination-log")
    try:
        config = from_env()
    except errors.SettingsError as e:
        log.error("SETTINGS %s", e)
        message = f"Invalid settings: {e}"
        print(message, file=sys.stderr)
        write_termination(termination_log, message)
        return 1
    code, message = run(config)
    write_termination(config.importer.termination_log, message)
    print(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
