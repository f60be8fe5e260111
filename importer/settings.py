"""The worker's environment contract, read once at start into one typed object.

KubeVirt CDI configures its importer pod through environment variables; we read
the same names so a pod spec written for CDI works unchanged.  Four more
variables replace CDI's fixed pod paths (``/data``, ``/dev/cdi-block-volume``,
``/scratch``, ``/dev/termination-log``) so the same worker runs as a plain
subprocess next to ``cdi serve``; a fifth, ``IMPORTER_IMAGE_DIR``, names where a
node-pull importer finds its image volume (``/containerdisk``).  A bad value
fails here, naming the variable, instead of deep inside a transfer.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from importer import errors, units

SourceKind = Literal["http", "registry", "s3", "none"]
ContentType = Literal["kubevirt", "archive"]
PullMethod = Literal["pod", "node"]

SOURCES: tuple[str, ...] = ("http", "registry", "s3", "none")
CHECKSUM_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no", ""}
_EXTRA_HEADER = re.compile(r"^IMPORTER_EXTRA_HEADER_(\d+)$")
_OVERHEAD = re.compile(r"^(0(?:\.\d{1,3})?|1(?:\.0{1,3})?)$")


@dataclasses.dataclass(frozen=True)
class Checksum:
    algorithm: str  # md5 | sha1 | sha256 | sha512
    digest: str  # lower-case hex


@dataclasses.dataclass(frozen=True)
class Settings:
    # What to import.
    source: SourceKind = "http"
    endpoint: str = ""
    content_type: ContentType = "kubevirt"
    checksum: Checksum | None = None

    # How large the volume is and how to fill it.
    image_size: int | None = None  # bytes requested for the volume (IMPORTER_IMAGE_SIZE)
    filesystem_overhead: float = 0.0  # fraction of a filesystem volume lost to the fs
    preallocation: bool = False
    cache_mode_try_none: bool = False  # CACHE_MODE=TRYNONE: O_DIRECT for qemu-img if possible

    # How to reach the source.
    access_key: str | None = None  # basic auth user (IMPORTER_ACCESS_KEY_ID)
    secret_key: str | None = None  # basic auth password (IMPORTER_SECRET_KEY)
    extra_headers: tuple[tuple[str, str], ...] = ()
    cert_dir: Path | None = None  # directory of extra CA certificates
    proxy_cert_dir: Path | None = None
    insecure_tls: bool = False
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    stall_timeout: float = 600.0  # seconds without a byte before a connection is given up
    retries: int = 5  # reconnect attempts after a dropped connection, per transfer
    retry_backoff: float = 1.0  # first delay between attempts, doubled each time, max 30 s

    # Where things are.
    owner_uid: str = ""
    data_dir: Path = Path("/data")
    block_path: Path = Path("/dev/cdi-block-volume")
    scratch_dir: Path = Path("/scratch")
    termination_log: Path = Path("/dev/termination-log")

    # Progress metrics: "host:port" ("" disables); port 0 picks a free one and
    # writes the bound "host:port" to metrics_address_file.
    metrics_address: str = ":8443"
    metrics_address_file: Path | None = None
    # Registry source: the platform architecture picked from an image index ("" = this
    # machine's), whether the registry is on CDIConfig's insecureRegistries list (plain
    # HTTP or unverified TLS).
    registry_architecture: str = ""
    insecure_registry: bool = False
    docker_config: Path | None = None  # a .dockerconfigjson file (a pull secret's key)
    # IMPORTER_PULL_METHOD (CDI's): "node" reads the image the kubelet mounted at image_dir
    # (an OCI image volume) instead of pulling it from the registry.
    pull_method: PullMethod = "pod"
    image_dir: Path = Path("/containerdisk")

    @property
    def target_file(self) -> Path:
        return self.data_dir / "disk.img"

    @property
    def is_block(self) -> bool:
        return self.block_path.exists()

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.access_key and self.secret_key:
            return (self.access_key, self.secret_key)
        return None


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read every variable of the contract; raise SettingsError on the first bad one."""
    e = os.environ if env is None else env

    def get(name: str) -> str | None:
        value = e.get(name)
        return value if value not in (None, "") else None

    source = (get("IMPORTER_SOURCE") or "http").lower()
    if source not in SOURCES:
        raise errors.SettingsError(
            variable="IMPORTER_SOURCE", reason=f"Unknown data source: {source}"
        )
    endpoint = get("IMPORTER_ENDPOINT") or ""
    if source != "none" and not endpoint:
        raise errors.SettingsError(
            variable="IMPORTER_ENDPOINT",
            reason=f"{'an' if source in ('http', 's3') else 'a'} {source} import needs "
                   "the URL of the image",
        )
    if source in ("http", "s3") and not re.match(r"^https?://", endpoint, re.IGNORECASE):
        raise errors.SettingsError(
            variable="IMPORTER_ENDPOINT",
            reason="the URL must start with http:// or https://",
        )
    if source == "registry" and not re.match(r"^(docker://|oci-archive:)", endpoint):
        raise errors.SettingsError(
            variable="IMPORTER_ENDPOINT",
            reason="a registry image is docker://host[:port]/repo[:tag|@digest] "
                   "or oci-archive:<path>",
        )

    pull_method = (get("IMPORTER_PULL_METHOD") or "pod").lower()
    if pull_method not in ("pod", "node"):
        raise errors.SettingsError(variable="IMPORTER_PULL_METHOD",
                                   reason=f"{pull_method!r} is neither pod nor node")
    if pull_method == "node" and not (source == "registry" and endpoint.startswith("docker://")):
        raise errors.SettingsError(variable="IMPORTER_PULL_METHOD",
                                   reason="node pull is for docker:// registry images")

    # CDI treats unknown content types as kubevirt.
    content_type: ContentType = (
        "archive" if (get("IMPORTER_CONTENTTYPE") or "").lower() == "archive" else "kubevirt"
    )

    return Settings(
        source=source,  # type: ignore[arg-type]  # checked against SOURCES above
        endpoint=endpoint,
        content_type=content_type,
        checksum=_checksum(get("IMPORTER_CHECKSUM")),
        image_size=quantity("IMPORTER_IMAGE_SIZE", get("IMPORTER_IMAGE_SIZE")),
        filesystem_overhead=_overhead(get("FILESYSTEM_OVERHEAD")),
        preallocation=_bool("PREALLOCATION", get("PREALLOCATION")),
        cache_mode_try_none=(get("CACHE_MODE") or "").upper() == "TRYNONE",
        access_key=get("IMPORTER_ACCESS_KEY_ID"),
        secret_key=get("IMPORTER_SECRET_KEY"),
        extra_headers=_extra_headers(e, get("IMPORTER_SECRET_EXTRA_HEADERS_DIR")),
        cert_dir=_dir("IMPORTER_CERT_DIR", get("IMPORTER_CERT_DIR")),
        proxy_cert_dir=_dir("IMPORTER_PROXY_CERT_DIR", get("IMPORTER_PROXY_CERT_DIR")),
        insecure_tls=_bool("INSECURE_TLS", get("INSECURE_TLS")),
        http_proxy=get("http_proxy") or get("HTTP_PROXY"),
        https_proxy=get("https_proxy") or get("HTTPS_PROXY"),
        no_proxy=get("no_proxy") or get("NO_PROXY"),
        stall_timeout=_number("IMPORTER_STALL_TIMEOUT", get("IMPORTER_STALL_TIMEOUT"), 600.0),
        retries=int(_number("IMPORTER_RETRIES", get("IMPORTER_RETRIES"), 5)),
        retry_backoff=_number("IMPORTER_RETRY_BACKOFF", get("IMPORTER_RETRY_BACKOFF"), 1.0),
        owner_uid=get("OWNER_UID") or "",
        data_dir=Path(get("IMPORTER_DATA_DIR") or "/data"),
        block_path=Path(get("IMPORTER_BLOCK_PATH") or "/dev/cdi-block-volume"),
        scratch_dir=Path(get("IMPORTER_SCRATCH_DIR") or "/scratch"),
        termination_log=Path(get("IMPORTER_TERMINATION_LOG") or "/dev/termination-log"),
        metrics_address=e.get("IMPORTER_METRICS_ADDRESS", ":8443"),
        metrics_address_file=_path(get("IMPORTER_METRICS_ADDRESS_FILE")),
        registry_architecture=get("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE") or "",
        insecure_registry=_bool("IMPORTER_INSECURE_REGISTRY", get("IMPORTER_INSECURE_REGISTRY")),
        docker_config=_docker_config(get("IMPORTER_DOCKER_CONFIG")),
        pull_method="node" if pull_method == "node" else "pod",
        image_dir=Path(get("IMPORTER_IMAGE_DIR") or "/containerdisk"),
    )


def _docker_config(value: str | None) -> Path | None:
    """The pull secret's ``.dockerconfigjson``; a secret without that key mounts no file."""
    if value is None:
        return None
    path = Path(value)
    return path if path.is_file() else None


def _bool(name: str, value: str | None) -> bool:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise errors.SettingsError(variable=name, reason=f"{value!r} is not a boolean (true/false)")


def _number(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if n < 0:
        raise errors.SettingsError(variable=name, reason=f"{value!r} is not a non-negative number")
    return n


def quantity(name: str, value: str | None) -> int | None:
    """A positive size from variable NAME (a Kubernetes quantity), or None if unset."""
    if value is None:
        return None
    try:
        n = units.parse_quantity(value)
    except ValueError as e:
        raise errors.SettingsError(variable=name, reason=str(e)) from e
    if n <= 0:
        raise errors.SettingsError(variable=name, reason="the size must be positive")
    return n


def _overhead(value: str | None) -> float:
    if value is None:
        return 0.0
    if not _OVERHEAD.match(value.strip()):
        raise errors.SettingsError(
            variable="FILESYSTEM_OVERHEAD",
            reason=f"{value!r} is not a fraction between 0 and 1 with at most 3 decimals",
        )
    return float(value)


def _checksum(value: str | None) -> Checksum | None:
    if value is None:
        return None
    algorithm, sep, digest = value.strip().partition(":")
    algorithm, digest = algorithm.lower(), digest.lower()
    expected = CHECKSUM_LENGTHS.get(algorithm)
    if not sep or expected is None:
        raise errors.SettingsError(
            variable="IMPORTER_CHECKSUM",
            reason=f"{value!r} must be <md5|sha1|sha256|sha512>:<hex digest>",
        )
    if len(digest) != expected or not re.fullmatch(r"[0-9a-f]+", digest):
        raise errors.SettingsError(
            variable="IMPORTER_CHECKSUM",
            reason=f"a {algorithm} digest is {expected} hexadecimal characters",
        )
    return Checksum(algorithm, digest)


def _split_header(variable: str, line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if not sep or not name.strip() or any(c in line for c in "\r\n"):
        raise errors.SettingsError(
            variable=variable, reason="a header is 'Name: value' on one line"
        )
    return name.strip(), value.strip()


def _extra_headers(env: Mapping[str, str], secret_dir: str | None) -> tuple[tuple[str, str], ...]:
    indexed: list[tuple[int, str, str]] = []
    for key, value in env.items():
        m = _EXTRA_HEADER.match(key)
        if m:
            indexed.append((int(m.group(1)), key, value))
    headers = [_split_header(key, value) for _, key, value in sorted(indexed)]
    # Secret headers: one directory per secret, each non-dot file one "Name: value".
    if secret_dir is not None and Path(secret_dir).is_dir():
        for sub in sorted(Path(secret_dir).iterdir()):
            files = [sub] if sub.is_file() else sorted(sub.iterdir()) if sub.is_dir() else []
            for f in files:
                if f.is_file() and not f.name.startswith("."):
                    line = f.read_text().strip()
                    headers.append(_split_header("IMPORTER_SECRET_EXTRA_HEADERS_DIR", line))
    return tuple(headers)


def _dir(name: str, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_dir():
        raise errors.SettingsError(variable=name, reason=f"{value} is not a directory")
    return p


def is_loopback(host: str) -> bool:
    """Whether HOST (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _path(value: str | None) -> Path | None:
    return Path(value) if value is not None else None
