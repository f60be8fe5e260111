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
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import prometheus_client

from importer import errors, settings, units
from importer.__main__ import write_termination
from importer.clonesend import Attempt, CloneError, Dropped, Percent
from importer.progress import Progress
from importer.progress import serve as serve_metrics
from importer.upload import localsocket, sparse

log = logging.getLogger("importer.clonesource")

DEFAULT_SOURCE_DIR = Path("/var/run/cdi/clone/source")
MAX_BACKOFF = 30.0
# Variables of the import worker that mean nothing here.
_IMPORT_ONLY = ("IMPORTER_SOURCE", "IMPORTER_ENDPOINT", "IMPORTER_CONTENTTYPE",
                "IMPORTER_CHECKSUM", "IMPORTER_IMAGE_SIZE")
_SAFE_PATH = re.compile(r"^/[!-~]*$")  # printable, no spaces: goes into the request line


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


# --- the worker -----------------------------------------------------------------------


def run(config: Config) -> tuple[int, str]:
    """Send the source to the target, retrying dropped attempts: (exit code, message)."""
    s = config.importer
    started = time.monotonic()
    progress = Progress(s.owner_uid)
    labels = {"ownerUID": s.owner_uid}
    percent = Percent(prometheus_client.Counter(
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
              progress: Progress, percent: Percent,
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
