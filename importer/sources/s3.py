"""S3 source: one GetObject streamed onto the volume, resumed after a dropped connection.

KubeVirt CDI reads an image from any S3-compatible store given a path-style
URL, ``http(s)://<host>[:port]/<bucket>/<key>``; this module follows its rules
(bucket = first path segment, signing region from the host name, ``http://``
without TLS, credentials from the ``accessKeyId``/``secretKey`` secret) with
boto3.  Without credentials the requests are unsigned (a public object).

The object is read like the HTTP source reads a body: straight from the socket
into the copy loop's buffers.  When the connection drops, the read continues
with ``Range: bytes=<offset>-`` and ``If-Match: <ETag of the first response>``;
an object replaced meanwhile fails that precondition and the import restarts
from byte 0 instead of mixing two objects.  Retries are bounded, with backoff.

Which path the data takes is decided from its magic bytes, as in CDI: raw and
compressed raw go straight to the target; images that need conversion go
through scratch space and qemu-img (the processor's Convert phase, which never
opens backing files); archives are extracted onto the volume.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3.session
import botocore
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.session
import urllib3

from importer import errors, formats, stream
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings
from importer.sources import resumable
from importer.sources.http import (
    CONNECT_TIMEOUT,
    USER_AGENT,
    ca_files,
    describe,
    proxies_for,
    redact,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"  # CDI's fallback when the host yields no usable region
# s3.<region>.amazonaws.com, s3-<region>.amazonaws.com, s3.dualstack.<region>...; also
# inside a longer name (bucket.s3.<region>...) and under amazonaws.com.cn.
_AWS_REGIONAL = re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_AWS_GLOBAL = re.compile(r"(?:^|\.)s3(?:-external-1)?\.amazonaws\.com$")  # us-east-1
# A region must be a host label, not all digits (botocore refuses anything else).
_VALID_REGION = re.compile(r"^(?![0-9]+$)(?!-)[a-z0-9-]{1,63}(?<!-)$")
_READ_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError,
                botocore.exceptions.BotoCoreError)


def open(settings: Settings, *, progress: Progress) -> S3Source:
    return S3Source(settings, progress=progress)


@dataclasses.dataclass(frozen=True)
class Location:
    """Where an object is, from a path-style URL."""

    endpoint_url: str  # scheme://host[:port], what boto3 connects to
    bucket: str
    key: str
    region: str  # the SigV4 signing region
    tls: bool

    @property
    def name(self) -> str:
        return f"{self.bucket}/{self.key}"


def region_for(host: str) -> str:
    """The signing region for HOST: CDI's rule, plus the legacy and global AWS names.

    ``s3.<region>.amazonaws.com`` and ``s3-<region>.amazonaws.com`` name their
    region, ``s3.amazonaws.com`` is us-east-1; any other host gives its first
    label (``minio.example.com`` -> ``minio``), as in CDI.  A label that cannot
    be a region (an IP address, an underscore) falls back to us-east-1, as CDI's
    does: S3-compatible stores accept any signing region.
    """
    host = host.lower().rstrip(".")
    regional = _AWS_REGIONAL.search(host)
    if _AWS_GLOBAL.search(host):
        region = DEFAULT_REGION
    elif regional:
        region = regional.group(1)
    else:
        region = host.split(".")[0]
    if not _VALID_REGION.match(region):
        log.info("REGION host=%s gives no valid region (%r), using %s", host, region,
                 DEFAULT_REGION)
        region = DEFAULT_REGION
    return region


def parse_url(url: str) -> Location:
    """Split a path-style S3 URL; raise SourceError if it is not one."""
    shape = "an S3 URL is http(s)://<host>[:port]/<bucket>/<key>"
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError as e:
        raise errors.SourceError(kind="s3", reason=f"the URL has a bad port: {shape}") from e
    host = parts.hostname or ""
    path = urllib.parse.unquote(parts.path).strip("/")
    bucket, _, key = path.partition("/")
    if scheme not in ("http", "https") or not host or not bucket or not key:
        raise errors.SourceError(kind="s3", reason=f"{redact(url)} is not a path-style "
                                 f"S3 URL: {shape}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return Location(endpoint_url=f"{scheme}://{netloc}", bucket=bucket, key=key,
                    region=region_for(host), tls=scheme == "https")


def signed(settings: Settings) -> bool:
    return settings.access_key is not None and settings.secret_key is not None


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def client_error_reason(e: botocore.exceptions.ClientError, location: Location, *,
                        signed: bool) -> str:
    """A one-line reason for an S3 error answer, naming the bucket or key."""
    error = e.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = _status(e)
    if code == "NoSuchBucket":
        return f'the bucket "{location.bucket}" does not exist'
    if code == "NoSuchKey" or (status == 404 and code in ("404", "NotFound")):
        return f'the key "{location.key}" does not exist in bucket "{location.bucket}"'
    if code == "InvalidAccessKeyId":
        return "access denied: the access key ID is not known (InvalidAccessKeyId)"
    if code == "SignatureDoesNotMatch":
        return ("access denied: the secret key does not match the access key ID "
                "(SignatureDoesNotMatch)")
    if status == 403 or code == "AccessDenied":
        if not signed:
            return "access denied to an anonymous request (no credentials were given)"
        return f"access denied ({code or status})"
    message = str(error.get("Message", "")) or "no message"
    return f"{code or 'HTTP'} (HTTP {status}): {message}"[:256]


def make_client(settings: Settings, location: Location, verify: str | bool) -> S3Client:
    """A boto3 S3 client that depends on SETTINGS only, not on AWS_* variables or files."""
    sign = signed(settings)
    config = botocore.config.Config(
        region_name=location.region,
        signature_version=None if sign else botocore.UNSIGNED,
        s3={"addressing_style": "path"},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=settings.stall_timeout,
        # One attempt per request: a dropped body is resumed by Body below, and a
        # failed first request fails the pod, which is restarted (as for HTTP).
        retries={"mode": "standard", "total_max_attempts": 1},
        proxies=proxies_for(settings, location.endpoint_url),
        user_agent_extra=USER_AGENT,
        # Whole-object checksums cannot be checked across resumed ranges.
        response_checksum_validation="when_required",
        use_fips_endpoint=False,
        use_dualstack_endpoint=False,
    )
    # No profile, config file or credentials file: a stray AWS_PROFILE would fail.
    isolated = {name: (None, None, default, None) for name, default in
                (("profile", None), ("config_file", os.devnull), ("credentials_file", os.devnull))}
    session = boto3.session.Session(
        botocore_session=botocore.session.Session(session_vars=isolated))
    return session.client(
        "s3",
        endpoint_url=location.endpoint_url,
        region_name=location.region,
        use_ssl=location.tls,
        verify=verify,
        aws_access_key_id=settings.access_key if sign else None,
        aws_secret_access_key=settings.secret_key if sign else None,
        config=config,
    )


def _raw(response: GetObjectOutputTypeDef) -> Any:
    """The body's http.client response, which reads straight into our buffer (botocore's
    StreamingBody and urllib3 would copy every chunk on the way), else urllib3's."""
    raw = response["Body"]._raw_stream  # type: ignore[attr-defined]
    fp = getattr(raw, "_fp", None)
    return fp if fp is not None and hasattr(fp, "readinto") else raw


class Body:
    """The object's bytes, read with readinto, continued with Range + If-Match after a drop."""

    def __init__(self, client: S3Client, location: Location, response: GetObjectOutputTypeDef,
                 *, settings: Settings, progress: Progress) -> None:
        self._client = client
        self._location = location
        self._settings = settings
        self._progress = progress
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag", "")
        self.offset = 0
        self.failures = 0  # consecutive failed attempts
        self._last_reason = "request failed"  # why the last resume request failed
        self._response: GetObjectOutputTypeDef | None = response
        self._fp: Any = _raw(response)

    def readinto(self, buf: memoryview) -> int:
        while True:
            if self.offset >= self.length:
                self.close()
                return 0
            if self._fp is None:
                self._recover(None)
                continue
            try:
                n = int(self._fp.readinto(buf))
            except _READ_ERRORS as e:
                self._recover(e)
                continue
            if n == 0:
                self._recover(EOFError("the server closed the connection before the end"))
                continue
            self.offset += n
            self.failures = 0
            self._progress.add_read(n)
            return n

    def _recover(self, cause: BaseException | None) -> None:
        self.close()
        self.failures += 1
        reason = describe(cause) if cause is not None else self._last_reason
        if self.failures > self._settings.retries:
            raise errors.TransferError(url=redact(self._settings.endpoint),
                                       attempts=self.failures, offset=self.offset, reason=reason)
        if not self.etag:
            raise errors.RestartRequired(reason=f"{reason}; the object has no ETag to resume with")
        delay = min(self._settings.retry_backoff * 2 ** (self.failures - 1), 30.0)
        log.warning("RESUME object=%s offset=%d attempt=%d delay=%.1f reason=%s",
                    self._location.name, self.offset, self.failures, delay, reason)
        time.sleep(delay)
        loc = self._location
        try:
            r = self._client.get_object(Bucket=loc.bucket, Key=loc.key,
                                        Range=f"bytes={self.offset}-", IfMatch=self.etag)
        except botocore.exceptions.ClientError as e:
            status = _status(e)
            if status == 412:
                raise errors.RestartRequired(reason="the object changed in the bucket") from e
            why = client_error_reason(e, loc, signed=signed(self._settings))
            if status in (400, 401, 403, 404):  # asking again will not change the answer
                raise errors.TransferError(url=redact(self._settings.endpoint),
                                           attempts=self.failures, offset=self.offset,
                                           reason=why) from e
            self._last_reason = why
            log.warning("RESUME failed reason=%s", why)
            return  # _fp stays None: the next readinto tries again
        except botocore.exceptions.BotoCoreError as e:
            self._last_reason = describe(e)
            log.warning("RESUME failed reason=%s", self._last_reason)
            return
        expected = f"bytes {self.offset}-{self.length - 1}/{self.length}"
        if r.get("ContentRange") == expected and r.get("ETag") == self.etag:
            log.info("RESUMED object=%s range=%s", loc.name, expected)
            self._response, self._fp = r, _raw(r)
            return
        r["Body"].close()
        self._last_reason = f"the resumed response was for range {r.get('ContentRange')}"
        log.warning("RESUME refused content_range=%s etag=%s", r.get("ContentRange"),
                    r.get("ETag"))

    def close(self) -> None:
        if self._response is not None:
            self._response["Body"].close()
            self._response = None
        self._fp = None


def ca_bundle(settings: Settings, directory: Path) -> Path | None:
    """System roots plus the CA files of cert_dir/proxy_cert_dir in one PEM (CDI appends
    its CAs to the system pool); None when there are no extra CA files."""
    extra = ca_files(settings)
    if not extra:
        return None
    paths = ssl.get_default_verify_paths()
    system = next((Path(p) for p in (paths.cafile, paths.openssl_cafile)
                   if p and Path(p).is_file()), Path(botocore.httpsession.where()))
    bundle = directory / "ca-bundle.pem"
    with bundle.open("wb") as out:
        for f in (system, *extra):
            out.write(f.read_bytes().rstrip(b"\n") + b"\n")
    return bundle


class S3Source(resumable.ResumableSource):
    kind = "s3"

    def __init__(self, settings: Settings, *, progress: Progress) -> None:
        self._settings = settings
        self._progress = progress
        self.location = parse_url(settings.endpoint)
        if (settings.access_key is None) != (settings.secret_key is None):
            raise errors.SourceError(kind="s3", reason="the s3 access key and secret key must "
                                     "be set together or not at all")
        self._restarts = 0
        self._scratch_image: Path | None = None
        self._convert_url = ""
        self._tmp = Path(tempfile.mkdtemp(prefix="cdi-s3-"))
        self._client: S3Client | None = None
        self._body: Body | None = None
        self._hashing: stream.Hashing | None = None
        self._detected: formats.Detected
        try:
            verify: str | bool = True
            if settings.insecure_tls:
                verify = False
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                log.warning("TLS verification is off for this import (INSECURE_TLS)")
            else:
                bundle = ca_bundle(settings, self._tmp)
                if bundle is not None:
                    verify = str(bundle)
            self._client = make_client(settings, self.location, verify)
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening and restarting ------------------------------------------------

    def _get(self) -> GetObjectOutputTypeDef:
        loc, client = self.location, self._client
        assert client is not None
        try:
            return client.get_object(Bucket=loc.bucket, Key=loc.key)
        except botocore.exceptions.ClientError as e:
            reason = client_error_reason(e, loc, signed=signed(self._settings))
            raise errors.SourceError(
                kind="s3", reason=f'could not get s3 object "{loc.name}": {reason}') from e
        except botocore.exceptions.BotoCoreError as e:
            raise errors.SourceError(
                kind="s3", reason=f'could not get s3 object "{loc.name}" from '
                f"{loc.endpoint_url}: {describe(e)}") from e

    def _open(self) -> None:
        s, loc = self._settings, self.location
        response = self._get()
        assert self._client is not None
        self._body = Body(self._client, loc, response, settings=s, progress=self._progress)
        self._progress.set_total(self._body.length)
        reader: formats.Reader = self._body
        self._hashing = None
        if s.checksum is not None:
            self._hashing = stream.Hashing(self._body, s.checksum)
            reader = self._hashing
        self._detected = formats.detect(reader)
        log.info("SOURCE s3 endpoint=%s bucket=%s key=%s region=%s auth=%s layers=%s "
                 "length=%d etag=%s", loc.endpoint_url, loc.bucket, loc.key, loc.region,
                 "signed" if signed(s) else "anonymous", "/".join(self._detected.layers),
                 self._body.length, self._body.etag)

    def _restart(self, why: errors.RestartRequired) -> None:
        self._restarts += 1
        offset = self._body.offset if self._body is not None else 0
        if self._restarts > self._settings.retries:
            raise errors.TransferError(url=redact(self._settings.endpoint),
                                       attempts=self._restarts, offset=offset, reason=str(why))
        log.warning("RESTART attempt=%d reason=%s", self._restarts, why)
        if self._body is not None:
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
        if self._settings.content_type == "archive":
            return Phase.TRANSFER_DATA_DIR
        if self._detected.needs_conversion:
            return Phase.TRANSFER_SCRATCH
        return Phase.TRANSFER_DATA_FILE

    def _known_length(self) -> int | None:
        return self._body.length if self._body is not None else None

    def url(self) -> str:
        return self._convert_url

    def image_format(self) -> str:
        return self._detected.format

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._scratch_image is not None:
            self._scratch_image.unlink(missing_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
