"""Admission rules for each DataVolume source variant: URLs, checksums, registries, warm imports.

Split from ``validation`` because every variant has its own small grammar
(Go's URL parsing for http/s3/gcs/imageio/vddk, ``<algo>:<hex>`` checksums,
``docker://``/``oci-archive:`` registry references) and CDI words each failure
its own way.  Messages embed the field path the way CDI's webhook prints it
("spec.source Invalid source URL scheme: ftp://x"), so the DataImportCron
template ("Template.source ...") reuses them with another prefix.
"""

from __future__ import annotations

import dataclasses
import re

from cdi.api.datavolume import (
    PULL_NODE,
    PULL_POD,
    ContentType,
    DataVolumeSource,
    HTTPSource,
    ImageIOSource,
    NamespacedName,
    RegistrySource,
    VDDKSource,
)

__all__ = ["Cause", "causes", "checksum_error", "source_url_error"]

_CHECKSUM_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.DOTALL)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Characters Go's URL parser accepts in a host (after any "user@"); RFC 3986 reg-name,
# IP literals and a port.
_HOST = re.compile(r"^[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*$")
_URL_SCHEMES = ("http", "https", "gs")
_REGISTRY_SCHEMES = ("docker", "oci-archive")


@dataclasses.dataclass(frozen=True)
class Cause:
    """One reason for refusal, shaped like a Kubernetes ``StatusCause``."""

    message: str
    field: str
    reason: str = "FieldValueInvalid"


def causes(source: DataVolumeSource, content_type: str, field: str) -> list[Cause]:
    """Why CDI refuses this (single-variant) source; empty when it accepts it."""
    if source.http is not None:
        return _http(source.http, field)
    if source.s3 is not None:
        return _url_causes(source.s3.url, "S3", field)
    if source.gcs is not None:
        return _url_causes(source.gcs.url, "GCS", field)
    if source.blank is not None and content_type == ContentType.ARCHIVE:
        return [Cause("SourceType cannot be blank and the contentType be archive",
                      f"{field}.contentType")]
    if source.registry is not None:
        return _registry(source.registry, content_type, field)
    if source.imageio is not None:
        return _imageio(source.imageio, content_type, field)
    if source.vddk is not None:
        return _vddk(source.vddk, field)
    if source.pvc is not None and _incomplete(source.pvc):
        return [Cause(f"{field}.source.PVC source PVC is not valid", f"{field}.source.PVC")]
    if source.snapshot is not None and _incomplete(source.snapshot):
        return [Cause(f"{field}.source.Snapshot source snapshot is not valid",
                      f"{field}.source.Snapshot")]
    return []


def source_url_error(url: str | None) -> str:
    """CDI's complaint about an import URL ("" if fine): Go's request-URI parse, then the scheme."""
    if not url:
        return "source URL is empty"
    scheme = _request_uri_scheme(url)
    if scheme is None:
        return f"Invalid source URL: {url}"
    if scheme not in _URL_SCHEMES:
        return f"Invalid source URL scheme: {url}"
    return ""


def checksum_error(checksum: str) -> str:
    """Why ``<algo>:<hex>`` is malformed ("" if fine); algorithm and hex are case-insensitive."""
    algorithm, colon, digest = checksum.partition(":")
    if not colon:
        return f"invalid checksum format: expected 'algorithm:hash', got '{checksum}'"
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    if not digest:
        return "checksum hash value cannot be empty"
    if algorithm not in _CHECKSUM_HEX_LENGTHS:
        return (f"unsupported hash algorithm '{algorithm}': supported algorithms are: "
                "md5, sha1, sha256, sha512")
    expected = _CHECKSUM_HEX_LENGTHS[algorithm]
    if len(digest) != expected:
        return (f"invalid {algorithm} hash length: expected {expected} hex characters, "
                f"got {len(digest)}")
    for c in digest:
        if c not in "0123456789abcdef":
            return ("checksum hash is not valid hexadecimal: encoding/hex: invalid byte: "
                    f"{_go_rune(c)}")
    return ""


def _http(http: HTTPSource, field: str) -> list[Cause]:
    found = _url_causes(http.url, "HTTP", field)
    if http.checksum:
        error = checksum_error(http.checksum)
        if error:
            found.append(Cause(f"Invalid checksum format: {error}",
                               f"{field}.source.HTTP.checksum"))
    return found


def _url_causes(url: str | None, kind: str, field: str) -> list[Cause]:
    error = source_url_error(url)
    if not error:
        return []
    return [Cause(f"{field}.source {error}", f"{field}.source.{kind}.url")]


def _registry(registry: RegistrySource, content_type: str, field: str) -> list[Cause]:
    here = f"{field}.source.Registry"
    if content_type not in ("", ContentType.KUBEVIRT):
        return [Cause(f"ContentType must be {ContentType.KUBEVIRT} when Source is Registry",
                      f"{field}.contentType")]
    if (registry.url is None) == (registry.image_stream is None):
        return [Cause("Source registry should have either URL or ImageStream", here)]
    if registry.url is not None:
        scheme = _url_scheme(registry.url)
        if scheme is None:
            return [Cause(f"Illegal registry source URL {registry.url}", f"{here}.URL")]
        if scheme not in _REGISTRY_SCHEMES:
            return [Cause(f"Illegal registry source URL scheme {registry.url}", f"{here}.URL")]
    method = registry.pull_method
    if method is not None and method not in (PULL_POD, PULL_NODE):
        return [Cause(f'ImportMethod {method} is neither {PULL_POD}, {PULL_NODE} or ""',
                      f"{here}.importMethod")]
    if registry.image_stream is not None and not registry.image_stream:
        return [Cause("Source registry ImageStream is not valid", f"{here}.importMethod")]
    if registry.image_stream is not None and method != PULL_NODE:
        return [Cause("Source registry ImageStream is supported only with node pull import "
                      "method", f"{here}.importMethod")]
    return []


def _imageio(imageio: ImageIOSource, content_type: str, field: str) -> list[Cause]:
    here = f"{field}.source.Imageio"
    if content_type == ContentType.ARCHIVE:
        # Not a CDI webhook rule (CDI's importer simply ignores archive for ImageIO);
        # refused here so the mistake surfaces at admission, worded like the registry rule.
        return [Cause(f"ContentType must be {ContentType.KUBEVIRT} when Source is ImageIO",
                      f"{field}.contentType")]
    if not imageio.secret_ref or not imageio.disk_id:
        return [Cause(f"{here} source Imageio is not valid", here)]
    if not imageio.cert_config_map and not imageio.insecure_skip_verify:
        return [Cause(f"{here} source Imageio requires CertConfigMap or InsecureSkipVerify",
                      here)]
    return _url_causes(imageio.url, "ImageIO", field)


def _vddk(vddk: VDDKSource, field: str) -> list[Cause]:
    here = f"{field}.source.VDDK"
    if not (vddk.secret_ref and vddk.uuid and vddk.backing_file and vddk.thumbprint):
        return [Cause(f"{here} source VDDK is not valid", here)]
    return _url_causes(vddk.url, "VDDK", field)


def _incomplete(ref: NamespacedName) -> bool:
    return not ref.namespace or not ref.name


def _request_uri_scheme(url: str) -> str | None:
    """The lower-cased scheme ("" for an absolute path) if Go's ``url.ParseRequestURI``
    accepts ``url``, else None."""
    if _has_control_char(url) or _BAD_ESCAPE.search(url.split("#", 1)[0]):
        return None
    m = _SCHEME.match(url)
    if m is None:
        return "" if url.startswith("/") else None
    rest = m.group(2)
    if not rest.startswith("/"):
        return None  # opaque ("mailto:x") is not a request URI
    if rest.startswith("//"):
        authority = re.split(r"[/?]", rest[2:], maxsplit=1)[0]
        host = authority.rsplit("@", 1)[-1]
        if not _HOST.match(host):
            return None
    return m.group(1).lower()


def _url_scheme(url: str) -> str | None:
    """The lower-cased scheme ("" if none) if Go's lenient ``url.Parse`` accepts ``url``."""
    if _has_control_char(url) or _BAD_ESCAPE.search(url.split("#", 1)[0]) or \
            url.startswith(":"):
        return None
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _has_control_char(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _go_rune(c: str) -> str:
    """A character as Go's ``%#U`` prints it: U+0067 'g'."""
    code = f"U+{ord(c):04X}"
    return f"{code} '{c}'" if c.isprintable() else code
