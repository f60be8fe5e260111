"""The upload server's environment contract, read once at start into one typed object.

Volume paths, space maths and progress labels are the import worker's
(``importer.settings``), read with the same variable names, so the embedded
pod runner wires mounts the same way for both workers.  On top come CDI's
upload server variables (listen address, TLS files, deadline, the requested
size as ``UPLOAD_IMAGE_SIZE``).  A bad value fails here, naming the variable.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path

from importer import errors, settings
from importer.upload import clone, localsocket

STATE_NAME = ".upload-state.json"
DEFAULT_PORT = 8443
# Variables of the import worker that mean nothing to an upload.
_IMPORT_ONLY = ("IMPORTER_SOURCE", "IMPORTER_ENDPOINT", "IMPORTER_CONTENTTYPE",
                "IMPORTER_CHECKSUM", "IMPORTER_IMAGE_SIZE", "IMPORTER_METRICS_ADDRESS")
_TLS_VERSIONS = {
    "versiontls12": ssl.TLSVersion.TLSv1_2, "1.2": ssl.TLSVersion.TLSv1_2,
    "versiontls13": ssl.TLSVersion.TLSv1_3, "1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclasses.dataclass(frozen=True)
class UploadConfig:
    # Volume paths, size, overhead, preallocation, OWNER_UID, termination log:
    # the import worker's settings (its source is "none": the data comes from requests).
    importer: settings.Settings

    listen_host: str = "0.0.0.0"  # noqa: S104 - a pod's upload port is meant to be reached
    listen_port: int = DEFAULT_PORT  # 0 picks a free port
    address_file: Path | None = None  # where the bound "host:port" is written
    # LISTEN_SOCKET: also listen on this Unix socket, plain HTTP, for clients on this
    # machine running as our user (cdi serve's proxy and clone sources); see localsocket.
    listen_socket: Path | None = None

    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: client certificates are required (mutual TLS)
    client_name: str | None = None  # set: the client certificate must name it (CN or SAN)
    tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    deadline: datetime.datetime | None = None  # no upload completed by then: exit 1
    state_file: Path | None = None  # UPLOAD_STATE_FILE; default: see resume_state_file
    linger: float = 0.0  # seconds to keep answering (409) after the upload completed
    clone: bool = False  # UPLOAD_CLONE: take one sparse clone stream (upload.clone), not an upload

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def resume_state_file(self) -> Path | None:
        """Where the durable offset of a resumable upload is kept, if anywhere.

        Next to disk.img on a filesystem volume; for a block volume in the scratch
        directory, if there is one (a block device has no room for a file).
        """
        if self.state_file is not None:
            return self.state_file
        s = self.importer
        if not s.is_block:
            return s.data_dir / STATE_NAME
        if s.scratch_dir.is_dir():
            return s.scratch_dir / STATE_NAME
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plain HTTP (loopback only)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.tls_min_version
        try:
            ctx.load_cert_chain(certfile=self.tls_cert, keyfile=self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise errors.SettingsError(
                variable="TLS_CERT_FILE", reason=f"cannot load the certificate and key: {e}"
            ) from e
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as e:
                raise errors.SettingsError(
                    variable="CLIENT_CERT_FILE", reason=f"cannot load the CA bundle: {e}"
                ) from e
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def from_env(env: Mapping[str, str] | None = None) -> UploadConfig:
    """Read every variable of the contract; raise SettingsError on the first bad one."""
    e = os.environ if env is None else env

    def get(name: str) -> str | None:
        value = e.get(name)
        return value if value not in (None, "") else None

    base = {k: v for k, v in e.items() if k not in _IMPORT_ONLY}
    base["IMPORTER_SOURCE"] = "none"
    imp = dataclasses.replace(
        settings.from_env(base),
        image_size=settings.quantity("UPLOAD_IMAGE_SIZE", get("UPLOAD_IMAGE_SIZE")),
        # The metrics endpoint is opt-in: its default port is the upload port.
        metrics_address=e.get("IMPORTER_METRICS_ADDRESS", ""),
    )
    host = get("LISTEN_ADDRESS") or "0.0.0.0"  # noqa: S104
    cert, key = _file("TLS_CERT_FILE", get("TLS_CERT_FILE")), _file("TLS_KEY_FILE",
                                                                    get("TLS_KEY_FILE"))
    client_ca = _file("CLIENT_CERT_FILE", get("CLIENT_CERT_FILE"))
    if (cert is None) != (key is None):
        missing = "TLS_KEY_FILE" if key is None else "TLS_CERT_FILE"
        raise errors.SettingsError(variable=missing,
                                   reason="TLS needs both TLS_CERT_FILE and TLS_KEY_FILE")
    if cert is None and client_ca is not None:
        raise errors.SettingsError(variable="CLIENT_CERT_FILE",
                                   reason="client certificates need TLS_CERT_FILE and TLS_KEY_FILE")
    if get("CLIENT_NAME") is not None and client_ca is None:
        raise errors.SettingsError(variable="CLIENT_NAME",
                                   reason="checking the client's name needs CLIENT_CERT_FILE")
    if cert is None and not is_loopback(host):
        raise errors.SettingsError(
            variable="TLS_CERT_FILE",
            reason=f"refusing to listen on {host} without TLS: set TLS_CERT_FILE and "
                   "TLS_KEY_FILE (plain HTTP is only allowed on a loopback address)",
        )
    version = (get("TLS_MIN_VERSION") or "1.2").lower()
    if version not in _TLS_VERSIONS:
        raise errors.SettingsError(variable="TLS_MIN_VERSION",
                                   reason=f"{version!r} is not VersionTLS12 or VersionTLS13")
    return UploadConfig(
        importer=imp,
        listen_host=host,
        listen_port=_port(get("LISTEN_PORT")),
        address_file=Path(v) if (v := get("UPLOAD_ADDRESS_FILE")) else None,
        listen_socket=localsocket.check_path("LISTEN_SOCKET", v)
        if (v := get("LISTEN_SOCKET")) else None,
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca,
        client_name=get("CLIENT_NAME"),
        tls_min_version=_TLS_VERSIONS[version],
        deadline=_deadline(get("DEADLINE")),
        state_file=Path(v) if (v := get("UPLOAD_STATE_FILE")) else None,
        linger=_seconds("UPLOAD_LINGER_SECONDS", get("UPLOAD_LINGER_SECONDS")),
        clone=clone.mode_from_env(get("UPLOAD_CLONE")),
    )


def termination_log_from_env() -> Path:
    """Where the termination message goes even when the rest of the settings are bad."""
    return Path(os.environ.get("IMPORTER_TERMINATION_LOG") or "/dev/termination-log")


is_loopback = settings.is_loopback


def _port(value: str | None) -> int:
    if value is None:
        return DEFAULT_PORT
    if not re.fullmatch(r"\d{1,5}", value) or int(value) > 65535:
        raise errors.SettingsError(variable="LISTEN_PORT",
                                   reason=f"{value!r} is not a port number (0-65535)")
    return int(value)


def _file(name: str, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_file():
        raise errors.SettingsError(variable=name, reason=f"{value} is not a file")
    return p


def _deadline(value: str | None) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.strip())
    except ValueError as e:
        raise errors.SettingsError(variable="DEADLINE",
                                   reason=f"{value!r} is not an RFC 3339 time") from e
    if t.tzinfo is None:
        raise errors.SettingsError(variable="DEADLINE",
                                   reason=f"{value!r} has no time zone (RFC 3339 needs one)")
    return t


def _seconds(name: str, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0 <= n <= 3600:
        raise errors.SettingsError(variable=name, reason=f"{value!r} is not 0-3600 seconds")
    return n
