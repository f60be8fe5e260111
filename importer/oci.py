"""The OCI distribution protocol, spoken directly: references, manifests, auth.

KubeVirt CDI pulls containerdisks with containers/image; we have no Go library
and skopeo may not be installed, so the few pieces of the protocol an import
(and ``containerdisk`` publishing) needs live here: parsing
``host/repo[:tag|@digest]`` with Docker's defaults, the manifest and index
media types, picking a platform from an index, and a ``Client`` that pings
``/v2/``, answers ``Basic`` and ``Bearer`` (token server) challenges and
renews its token when a request is refused.  Everything a registry says is
untrusted: documents are size-limited, validated and checked against their
digests by the callers.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import platform
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import requests

from importer import errors
from importer.settings import Settings
from importer.sources import http

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
REF_NAME = "org.opencontainers.image.ref.name"

MAX_MANIFEST = 4 << 20  # bytes; distribution refuses manifests above 4 MiB as well
DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", DOCKER_HUB)
# uname -m -> the GOARCH names image indexes use.
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                  "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386",
                  "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


class Reader(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


class RegistryError(errors.ProcessingError):
    """The registry could not be read (or written): CDI's ImagePullFailed text."""

    msg = "failed to {self.operation} image: {self.reason}"
    operation: str  # pull | push


def pull_error(reason: str) -> RegistryError:
    return RegistryError(operation="pull", reason=reason)


class InvalidReference(errors.SettingsError):
    """IMPORTER_ENDPOINT does not name an image."""


@dataclasses.dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.registry}/{self.repository}{at}"


def parse_reference(text: str) -> Reference:
    """``host[:port]/repo[:tag|@digest]`` (``docker://`` optional) with Docker's defaults."""
    name = text.removeprefix("docker://")

    def bad(reason: str) -> InvalidReference:
        return InvalidReference(variable="IMPORTER_ENDPOINT",
                                reason=f"invalid image reference {text!r}: {reason}")

    name, _, digest = name.partition("@")
    if digest and not _DIGEST.match(digest):
        raise bad("a digest is sha256:<64 hex digits>")
    tag: str | None = None
    slash = name.rfind("/")
    if ":" in name[slash + 1:]:
        name, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise bad(f"{tag!r} is not a valid tag")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "docker.io", name
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise bad("the repository must be lower-case path components")
    return Reference(registry, repository, tag if tag or digest else "latest", digest or None)


def machine_architecture() -> str:
    machine = platform.machine().lower()
    return _ARCHITECTURES.get(machine, machine)


# -- documents ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, doc: Any) -> Descriptor:
        try:
            digest, size = doc["digest"], doc["size"]
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                raise ValueError(f"bad digest {digest!r}")
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"bad size {size!r}")
            return cls(str(doc.get("mediaType", "")), digest, size,
                       dict(doc.get("platform") or {}), dict(doc.get("annotations") or {}))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise pull_error(f"invalid descriptor: {e}") from e

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.platform:
            doc["platform"] = self.platform
        if self.annotations:
            doc["annotations"] = self.annotations
        return doc


@dataclasses.dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclasses.dataclass(frozen=True)
class Index:
    media_type: str
    manifests: list[Descriptor]


def parse_document(content: bytes, content_type: str = "") -> Manifest | Index:
    """A manifest or an index; the media type comes from the document or the response."""
    try:
        doc = json.loads(content)
    except ValueError as e:
        raise pull_error(f"invalid manifest: {e}") from e
    if not isinstance(doc, dict):
        raise pull_error("invalid manifest: not a JSON object")
    media = str(doc.get("mediaType") or content_type.split(";")[0].strip())
    if not media:
        media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media in INDEXES or (media not in MANIFESTS and "manifests" in doc):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise pull_error("invalid image index: no manifests")
        return Index(media, [Descriptor.parse(e) for e in entries])
    if media not in MANIFESTS or doc.get("schemaVersion") != 2:
        raise pull_error(f"unsupported manifest type {media or 'unknown'}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or "config" not in doc:
        raise pull_error("invalid manifest: no config or layers")
    return Manifest(media, Descriptor.parse(doc["config"]), [Descriptor.parse(d) for d in layers])


def select_platform(index: Index, architecture: str, os: str = "linux") -> Descriptor:
    """The index entry for ARCHITECTURE/OS; none -> an error listing what there is."""
    for d in index.manifests:
        if (d.platform.get("architecture") == architecture
                and d.platform.get("os", os) == os):
            return d
    available = sorted({f"{d.platform.get('os', '?')}/{d.platform.get('architecture', '?')}"
                        for d in index.manifests})
    raise pull_error(
        f"choosing image instance: no image found in image index for architecture "
        f"\"{architecture}\", OS \"{os}\"; the index has: {', '.join(available) or 'nothing'}")


def registry_error(r: requests.Response) -> str:
    """The registry's error list as containers/image prints it ("unauthorized: ...")."""
    try:
        body = json.loads(r.content[:64 << 10]) if r.content else {}
        parts = [f"{str(e['code']).lower().replace('_', ' ')}: {e.get('message', '')}"
                 for e in body.get("errors", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        parts = []
    return "; ".join(parts)[:256] or f"{r.status_code} {r.reason}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {...}); ("", {}) if none."""
    m = re.search(r"\b(Bearer|Basic)\b", header, re.IGNORECASE)
    if not m:
        return "", {}
    params = {k.lower(): re.sub(r"\\(.)", r"\1", quoted) or bare
              for k, quoted, bare in _PARAM.findall(header[m.end():])}
    return m.group(1).lower(), params


# -- digests ----------------------------------------------------------------------


def _mismatch(what: str, expected: str, actual: str) -> RegistryError:
    return pull_error(f"{what}: digest mismatch: expected {expected}, calculated {actual}")


def check_digest(content: bytes, digest: str, what: str) -> None:
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, content).hexdigest()
    if actual != expected:
        raise _mismatch(what, digest, f"{algorithm}:{actual}")


class Verifying:
    """A blob's bytes, hashed as they pass; at the end its size and digest must match."""

    def __init__(self, src: Reader, desc: Descriptor,
                 progress: Callable[[int], None] | None = None) -> None:
        self._src = src
        self.desc = desc
        self._progress = progress
        algorithm = desc.digest.partition(":")[0]
        self._hash = hashlib.new(algorithm)
        self.offset = 0
        self.verified = False

    def readinto(self, buf: memoryview) -> int:
        n = self._src.readinto(buf)
        if n == 0:
            self._verify()
            return 0
        self.offset += n
        if self.offset > self.desc.size:
            raise pull_error(
                f"blob {self.desc.digest}: size mismatch: more than the {self.desc.size} "
                "bytes its descriptor declares")
        self._hash.update(buf[:n])
        if self._progress is not None:
            self._progress(n)
        return n

    def _verify(self) -> None:
        if self.verified:
            return
        if self.offset != self.desc.size:
            raise pull_error(
                f"blob {self.desc.digest}: size mismatch: {self.offset} bytes, "
                f"expected {self.desc.size}")
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.desc.digest:
            raise _mismatch(f"blob {self.desc.digest}", self.desc.digest, actual)
        self.verified = True

    def drain(self, buf: bytearray) -> None:
        """Read to the end (what tar and the decompressor left) so the digest is checked."""
        with memoryview(buf) as view:
            while self.readinto(view):
                pass

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if close is not None:
            close()


# -- credentials ------------------------------------------------------------------


def _host_of(key: str) -> str:
    if "://" not in key:
        key = "//" + key
    host = urllib.parse.urlsplit(key).netloc.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def credentials_from_dockerconfig(json_text: str, registry_host: str) -> tuple[str, str] | None:
    """The user and password for REGISTRY_HOST from a ``.dockerconfigjson`` (or legacy
    ``.dockercfg``) document; None if it has no entry for that host."""
    try:
        doc = json.loads(json_text)
    except ValueError as e:
        raise errors.SettingsError(variable="docker config",
                                   reason=f"not valid JSON: {e}") from e
    auths = doc.get("auths", doc) if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    want = _host_of(registry_host)
    for key, entry in auths.items():
        if _host_of(key) != want or not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(password, str) and user:
            return user, password
        if isinstance(entry.get("auth"), str):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as e:
                raise errors.SettingsError(variable="docker config",
                                           reason=f"the auth of {key} is not base64") from e
            user, sep, password = decoded.partition(":")
            if sep and user:
                return user, password
    return None


# -- the client -------------------------------------------------------------------


class Client:
    """Requests to one repository of one registry, authenticated as the registry asks.

    ``insecure`` (CDIConfig's insecureRegistries, or INSECURE_TLS) allows plain
    HTTP when HTTPS fails, and the session does not verify certificates.
    """

    def __init__(self, ref: Reference, *, settings: Settings, session: requests.Session,
                 insecure: bool, operation: str = "pull") -> None:
        self.ref = ref
        self.operation = operation
        self._settings = settings
        self._session = session
        self._insecure = insecure
        actions = "pull,push" if operation == "push" else "pull"
        self._scope = f"repository:{ref.repository}:{actions}"
        self._base: str | None = None
        self._authorization: str | None = None
        self._tried: set[str] = set()  # authorizations refused already

    def error(self, reason: str) -> RegistryError:
        return RegistryError(operation=self.operation, reason=reason)

    @property
    def base(self) -> str:
        if self._base is None:
            self._ping()
        assert self._base is not None
        return self._base

    def _ping(self) -> None:
        schemes = ("https", "http") if self._insecure else ("https",)
        failure: requests.RequestException | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.ref.registry}/v2/"
            try:
                r = self._send("GET", url, {}, None, stream=False)
            except requests.RequestException as e:
                log.info("PING url=%s failed: %s", url, http.describe(e))
                failure = failure or e
                continue
            self._base = f"{scheme}://{self.ref.registry}"
            log.info("PING url=%s status=%d", url, r.status_code)
            if r.status_code == 401:
                self._authenticate(r.headers.get("WWW-Authenticate", ""))
            return
        assert failure is not None
        raise self.error(f"pinging container registry {self.ref.registry}: "
                         f"{http.describe(failure)}") from failure

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any, *,
              stream: bool) -> requests.Response:
        return self._session.request(
            method, url, headers=headers, data=data, stream=stream, allow_redirects=True,
            proxies=http.proxies_for(self._settings, url),
            timeout=(http.CONNECT_TIMEOUT, self._settings.stall_timeout))

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False) -> requests.Response:
        """PATH (``/v2/...`` or an absolute URL the registry gave); a 401 is answered once
        with fresh credentials.  Transport failures are left to the caller."""
        url = path if "://" in path else self.base + path
        for attempt in range(2):
            h = dict(headers or {})
            if self._authorization:
                h["Authorization"] = self._authorization
            r = self._send(method, url, h, data, stream=stream)
            if r.status_code != 401 or attempt or (data is not None and hasattr(data, "read")):
                return r
            challenge = r.headers.get("WWW-Authenticate", "")
            if not self._authenticate(challenge):
                return r
            r.close()
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: str) -> bool:
        """Set the Authorization header the challenge asks for; False if nothing new."""
        scheme, params = parse_challenge(challenge)
        creds = self._settings.basic_auth
        if scheme == "basic":
            if creds is None:
                return False
            value = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        elif scheme == "bearer" and params.get("realm"):
            token = self._token(params)
            value = f"Bearer {token}"
        else:
            return False
        if value in self._tried:
            return False
        self._tried.add(value)
        self._authorization = value
        return True

    def _token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        query: dict[str, str] = {}
        if params.get("service"):
            query["service"] = params["service"]
        query["scope"] = params.get("scope") or self._scope
        creds = self._settings.basic_auth
        if creds is not None:
            query["account"] = creds[0]
        try:
            r = self._session.get(realm, params=query, auth=creds,
                                  proxies=http.proxies_for(self._settings, realm),
                                  timeout=(http.CONNECT_TIMEOUT, self._settings.stall_timeout))
        except requests.RequestException as e:
            raise self.error(f"unable to retrieve auth token: {http.describe(e)}") from e
        if r.status_code == 401:
            why = "invalid username/password" if creds else "anonymous access refused"
            raise self.error(f"unable to retrieve auth token: {why}: {registry_error(r)}")
        if r.status_code != 200:
            raise self.error(f"unable to retrieve auth token: {registry_error(r)}")
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.error("unable to retrieve auth token: the answer holds no token")
        log.info("TOKEN realm=%s scope=%s", http.redact(realm), query["scope"])
        return token

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """The manifest or index at REFERENCE (tag or digest) and its Content-Type."""
        where = f"{self.ref.registry}/{self.ref.repository}"
        try:
            r = self.request("GET", f"/v2/{self.ref.repository}/manifests/{reference}",
                             headers={"Accept": ACCEPT}, stream=True)
        except requests.RequestException as e:
            raise self.error(f"reading manifest {reference} in {where}: "
                             f"{http.describe(e)}") from e
        with r:
            if r.status_code != 200:
                raise self.error(f"reading manifest {reference} in {where}: {registry_error(r)}")
            content = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
        if len(content) > MAX_MANIFEST:
            raise self.error(f"manifest {reference} in {where} is larger than {MAX_MANIFEST}")
        return content, r.headers.get("Content-Type", "")
