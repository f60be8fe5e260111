"""Throw-away TLS material for tests: a trustme CA and a server certificate on disk."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

DEFAULT_HOSTNAMES: tuple[str, ...] = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files written by :func:`write_tls_files`.

    ``ca_cert`` is the CA certificate alone. ``ca_dir`` is a directory that holds
    nothing but a copy of that certificate, named ``ca.crt`` (the shape of CDI's
    ``/certs`` "directory of CA files"). ``server_cert`` is the leaf certificate
    followed by its chain, ``server_key`` the leaf's private key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_dir: Path


def make_ca() -> trustme.CA:
    """A new, in-memory certificate authority."""
    return trustme.CA()


def write_tls_files(
    tmp_dir: Path,
    ca: trustme.CA,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
) -> TLSFiles:
    """Issue a server certificate for ``hostnames`` from ``ca`` and write all PEM files
    under ``tmp_dir`` (created if needed).

    Layout: ``ca.pem``, ``server.pem``, ``server.key`` and ``ca/ca.crt``.
    IP addresses in ``hostnames`` become IP subjectAltNames.
    """
    if not hostnames:
        raise ValueError("at least one hostname is needed")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*hostnames)

    ca_cert = tmp_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_cert))

    server_cert = tmp_dir / "server.pem"
    server_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))

    server_key = tmp_dir / "server.key"
    leaf.private_key_pem.write_to_path(str(server_key))
    server_key.chmod(0o600)

    ca_dir = tmp_dir / "ca"
    ca_dir.mkdir(exist_ok=True)
    (ca_dir / "ca.crt").write_bytes(ca.cert_pem.bytes())

    return TLSFiles(ca_cert=ca_cert, server_cert=server_cert, server_key=server_key, ca_dir=ca_dir)


def server_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """A server-side context presenting ``files.server_cert`` / ``files.server_key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=files.server_cert, keyfile=files.server_key)
    return context


def client_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """A client-side context that trusts only the test CA (hostname checking on)."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_cert))
