"""HTTP(S) source: one GET streamed onto the volume, resumed after a dropped connection.

The body is read with ``readinto`` straight from the socket into the copy
loop's buffer.  When the connection drops (reset, short body, stall) the
transfer continues with ``Range: bytes=<offset>-`` and ``If-Range`` set to the
validator of the first response, so a file that changed on the server restarts
the import from byte 0 instead of mixing two files.  A server without Range
support restarts from 0 as well.  Retries are bounded, with backoff.

Which path the data takes is decided from its magic bytes (``formats``): raw
and compressed raw go straight to the target; an uncompressed image that needs
conversion is read by qemu-img through nbdkit when the server supports Range
(no scratch space); anything else is written to scratch and converted.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import requests
import requests.adapters
import requests.utils
import urllib3

from importer import errors, formats, nbdkit, qemu_img, stream
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings
from importer.sources import resumable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
USER_AGENT = "cdi-importer"
SCRATCH_IMAGE = resumable.SCRATCH_IMAGE
_READ_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)
# Extra headers that pin the import to one version of the file (a DataImportCron's
# import of the version it polled): a changed file answers 412.
PIN_HEADERS = ("if-match", "if-unmodified-since")


def open(settings: Settings, *, progress: Progress) -> HTTPSource:
    return HTTPSource(settings, progress=progress)


def redact(url: str) -> str:
    """The URL without user:password@ and without its query (which may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def describe(exc: BaseException) -> str:
    """A one-line reason for a connection failure, from the root of the exception chain."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {e.verify_message}"
        e = e.__cause__ or e.__context__ or (e.args[0] if e.args and
                                              isinstance(e.args[0], BaseException) else None)
        if e is None and seen and isinstance(seen[-1], urllib3.exceptions.MaxRetryError):
            e = seen[-1].reason
    root = seen[-1]
    text = str(root)
    m = re.search(r"\[SSL: [A-Z_]+\] ([^(]+)", text)
    if m:
        return f"TLS error: {m.group(1).strip()}"
    if isinstance(root, ConnectionRefusedError) or "Connection refused" in text:
        return "connection refused"
    if isinstance(root, socket.gaierror) or "Name or service not known" in text:
        return "no such host"
    if isinstance(root, TimeoutError | socket.timeout) or "timed out" in text:
        return "timed out"
    if isinstance(root, http.client.IncompleteRead):
        return f"connection closed after {len(root.partial)} bytes of a response"
    return text[:256]


class _TLSAdapter(requests.adapters.HTTPAdapter):
    """Requests' adapter with our SSLContext (TLS >= 1.2, extra CA files)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)


def ca_files(settings: Settings) -> list[Path]:
    files: list[Path] = []
    for d in (settings.cert_dir, settings.proxy_cert_dir):
        if d is not None:
            files += [f for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]
    return files


def make_session(settings: Settings) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # the proxy variables were read into settings once
    s.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    for name, value in settings.extra_headers:
        s.headers[name] = value
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for f in ca_files(settings):
        ctx.load_verify_locations(cafile=str(f))
    if settings.insecure_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s.verify = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        log.warning("TLS verification is off for this import (INSECURE_TLS)")
    s.mount("https://", _TLSAdapter(ctx))
    return s


def auth_for(settings: Settings, url: str) -> tuple[str, str] | None:
    """Basic auth for URL: only on the endpoint's own host, never where a redirect led."""
    if settings.basic_auth is None:
        return None
    same = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(settings.endpoint).netloc
    return settings.basic_auth if same else None


def pin_of(settings: Settings) -> str | None:
    """The extra header pinning the import to a version of the file, if any."""
    return next((f"{name}: {value}" for name, value in settings.extra_headers
                 if name.lower() in PIN_HEADERS), None)


def proxies_for(settings: Settings, url: str) -> dict[str, str]:
    """The proxies for URL: none when no_proxy matches it (requests only applies no_proxy
    itself when it reads the environment, and we read the environment once, in settings)."""
    if settings.no_proxy and requests.utils.should_bypass_proxies(url, settings.no_proxy):
        return {}
    proxies = {"http": settings.http_proxy, "https": settings.https_proxy}
    return {k: v for k, v in proxies.items() if v}


class Body:
    """The body of a GET, read with readinto, continued with Range after a drop."""

    def __init__(self, session: requests.Session, response: requests.Response, *,
                 settings: Settings, progress: Progress) -> None:
        self._session = session
        self._settings = settings
        self._progress = progress
        self.url = response.url  # after redirects
        h = response.headers
        chunked = "chunked" in h.get("Transfer-Encoding", "").lower()
        self.length = int(h["Content-Length"]) if "Content-Length" in h and not chunked else None
        etag = h.get("ETag", "")
        self.validator = etag if etag and not etag.startswith("W/") else h.get("Last-Modified")
        self.ranges = h.get("Accept-Ranges", "").lower() == "bytes"
        self.offset = 0
        self.failures = 0  # consecutive failed attempts
        self._response = response
        self._fp = self._body_of(response)

    @property
    def resumable(self) -> bool:
        return self.ranges and self.length is not None

    @staticmethod
    def _body_of(response: requests.Response) -> Any:
        # http.client's response reads straight into our buffer; urllib3's
        # wrapper would copy every chunk twice on the way.
        raw = response.raw
        fp = getattr(raw, "_fp", None)
        return fp if fp is not None and hasattr(fp, "readinto") else raw

    def readinto(self, buf: memoryview) -> int:
        while True:
            if self._fp is None:
                self._recover(None)
                continue
            try:
                n = int(self._fp.readinto(buf))
            except _READ_ERRORS as e:
                self._recover(e)
                continue
            if n == 0 and self.length is not None and self.offset < self.length:
                self._recover(EOFError("the server closed the connection before the end"))
                continue
            if n:
                self.offset += n
                self.failures = 0
                self._progress.add_read(n)
            return n

    def _recover(self, cause: BaseException | None) -> None:
        self.close()
        self.failures += 1
        reason = describe(cause) if cause is not None else "request failed"
        if self.failures > self._settings.retries:
            raise errors.TransferError(url=redact(self.url), attempts=self.failures,
                                       offset=self.offset, reason=reason)
        if not self.resumable or not self.validator:
            raise errors.RestartRequired(reason=f"{reason}; the server cannot resume")
        delay = min(self._settings.retry_backoff * 2 ** (self.failures - 1), 30.0)
        log.warning("RESUME offset=%d attempt=%d delay=%.1f reason=%s",
                    self.offset, self.failures, delay, reason)
        time.sleep(delay)
        headers = {"Range": f"bytes={self.offset}-", "If-Range": self.validator or ""}
        try:
            r = self._session.get(self.url, headers=headers, stream=True, allow_redirects=True,
                                  auth=auth_for(self._settings, self.url),
                                  proxies=proxies_for(self._settings, self.url),
                                  timeout=(CONNECT_TIMEOUT, self._settings.stall_timeout))
        except requests.RequestException as e:
            log.warning("RESUME failed reason=%s", describe(e))
            return  # _fp stays None: the next readinto tries again
        expected = f"bytes {self.offset}-{(self.length or 0) - 1}/{self.length}"
        if r.status_code == 206 and r.headers.get("Content-Range", "") == expected:
            self._response, self._fp = r, self._body_of(r)
            return
        r.close()
        if r.status_code in (200, 412):  # 412: it no longer is the pinned version
            raise errors.RestartRequired(reason="the file changed on the server")
        log.warning("RESUME refused status=%d", r.status_code)

    def close(self) -> None:
        if self._fp is not None:
            self._response.close()
            self._fp = None


class HTTPSource(resumable.ResumableSource):
    kind = "http"

    def __init__(self, settings: Settings, *, progress: Progress) -> None:
        self._settings = settings
        self._progress = progress
        self._session = make_session(settings)
        self._restarts = 0
        self._nbdkit: nbdkit.Nbdkit | None = None
        self._ca_bundle: Path | None = None
        self._scratch_image: Path | None = None
        self._convert_url = ""
        self._body: Body
        self._hashing: stream.Hashing | None
        self._detected: formats.Detected
        self._open()

    # -- opening and restarting ------------------------------------------------

    def _open(self) -> None:
        s = self._settings
        try:
            r = self._session.get(s.endpoint, stream=True, allow_redirects=True,
                                  auth=s.basic_auth, proxies=proxies_for(s, s.endpoint),
                                  timeout=(CONNECT_TIMEOUT, s.stall_timeout))
        except requests.RequestException as e:
            raise errors.SourceError(reason=f"GET {redact(s.endpoint)}: {describe(e)}") from e
        if r.status_code == 412 and pin_of(s) is not None:
            r.close()
            raise errors.SourceError(
                reason=f"{redact(s.endpoint)} is no longer the version this import is pinned "
                       f"to ({pin_of(s)}): the server answered 412 Precondition Failed")
        if r.status_code != 200:
            r.close()
            raise errors.HTTPStatusError(status=r.status_code, status_text=r.reason or "")
        if r.headers.get("Content-Type", "").startswith("text/"):
            log.warning("CONTENT-TYPE %s: this may be a web page, not an image",
                        r.headers["Content-Type"])
        self._body = Body(self._session, r, settings=s, progress=self._progress)
        self._progress.set_total(self._body.length)
        reader: formats.Reader = self._body
        self._hashing = None
        if s.checksum is not None:
            self._hashing = stream.Hashing(self._body, s.checksum)
            reader = self._hashing
        self._detected = formats.detect(reader)
        log.info("SOURCE url=%s layers=%s length=%s ranges=%s", redact(s.endpoint),
                 "/".join(self._detected.layers), self._body.length, self._body.resumable)

    def _restart(self, why: errors.RestartRequired) -> None:
        self._restarts += 1
        if self._restarts > self._settings.retries:
            raise errors.TransferError(url=redact(self._body.url), attempts=self._restarts,
                                       offset=self._body.offset, reason=str(why))
        log.warning("RESTART attempt=%d reason=%s", self._restarts, why)
        self._body.close()
        time.sleep(min(self._settings.retry_backoff * 2 ** (self._restarts - 1), 30.0))
        self._progress.restart()
        try:
            self._open()
        except errors.SourceError as e:
            raise errors.TransferError(url=redact(self._settings.endpoint),
                                       attempts=self._restarts, offset=0, reason=str(e)) from e

    def _finish_stream(self) -> None:
        if self._hashing is not None:
            self._hashing.drain()
            self._hashing.verify()

    # -- the processor's interface ---------------------------------------------

    def info(self) -> Phase:
        d = self._detected
        if self._settings.content_type == "archive":
            return Phase.TRANSFER_DATA_DIR
        if not d.needs_conversion:
            return Phase.TRANSFER_DATA_FILE
        if (not d.compressed and self._body.resumable and self._settings.checksum is None
                and self._nbdkit_safe() and nbdkit.available() and self._qemu_friendly()):
            try:
                self._start_nbdkit()
                return Phase.CONVERT
            except errors.SourceError as e:
                log.warning("NBDKIT unavailable, using scratch space: %s", e)
        return Phase.TRANSFER_SCRATCH

    def _nbdkit_safe(self) -> bool:
        """Whether qemu-img may read this URL through nbdkit.

        nbdkit re-requests ranges for as long as qemu-img reads, so each request
        must be pinned to the file we started with (a validator, sent as
        If-Match / If-Unmodified-Since: a changed file then fails instead of
        mixing two versions).  Its arguments are visible to local users, so a
        URL with a query (often a signed token) or secret headers stay on the
        streaming path; a pin header (PIN_HEADERS) is no secret.
        """
        body = self._body
        if not body.validator:
            return False
        if urllib.parse.urlsplit(body.url).query or any(
                name.lower() not in PIN_HEADERS for name, _ in self._settings.extra_headers):
            return False
        return True

    def _validator_header(self) -> str:
        v = self._body.validator or ""
        return f"If-Match: {v}" if v.startswith('"') else f"If-Unmodified-Since: {v}"

    def _qemu_friendly(self) -> bool:
        """nbdkit's curl plugin learns the size with HEAD: the server must answer it."""
        try:
            r = self._session.head(self._body.url, allow_redirects=True,
                                   auth=auth_for(self._settings, self._body.url),
                                   proxies=proxies_for(self._settings, self._body.url),
                                   timeout=(CONNECT_TIMEOUT, self._settings.stall_timeout))
            r.close()
        except requests.RequestException as e:
            log.info("HEAD failed (%s): not streaming through nbdkit", describe(e))
            return False
        length = r.headers.get("Content-Length")
        if r.status_code != 200 or length != str(self._body.length):
            log.info("HEAD status=%d length=%s: not streaming through nbdkit",
                     r.status_code, length)
            return False
        return True

    def _start_nbdkit(self) -> None:
        files = ca_files(self._settings)
        if files:
            fd, name = tempfile.mkstemp(prefix="cdi-ca-", suffix=".pem")
            os.close(fd)
            self._ca_bundle = Path(name)
            self._ca_bundle.write_bytes(b"\n".join(f.read_bytes() for f in files))
        url = self._body.url
        self._body.close()
        self._nbdkit = nbdkit.Nbdkit(url, settings=self._settings, ca_bundle=self._ca_bundle,
                                     auth=auth_for(self._settings, url),
                                     pin_header=None if pin_of(self._settings)
                                     else self._validator_header())
        self._convert_url = self._nbdkit.start()
        # Read (and so pin in nbdkit's cache) the metadata the Convert phase checks.
        self._nbdkit.pin()
        try:
            qemu_img.info(self._convert_url, fmt=self._detected.format)
        except errors.InvalidImage:
            pass  # the Convert phase runs info again and reports it
        finally:
            self._nbdkit.unpin()

    def _known_length(self) -> int | None:
        return self._body.length

    def url(self) -> str:
        return self._convert_url

    def display_name(self) -> str:
        """The image as the user named it (never the NBD socket or a signed query)."""
        return redact(self._settings.endpoint)

    def image_format(self) -> str:
        return self._detected.format

    def close(self) -> None:
        self._body.close()
        if self._nbdkit is not None:
            self._nbdkit.stop()
        if self._ca_bundle is not None:
            self._ca_bundle.unlink(missing_ok=True)
        if self._scratch_image is not None:
            self._scratch_image.unlink(missing_ok=True)
        self._session.close()

