"""Small certificate authorities: the upload proxy's CA and the upload-server signers.

CDI keeps several signers: one for the upload proxy's serving certificate, one
that issues each upload server its own serving certificate, and one that issues
the proxy the client certificate upload servers require (mutual TLS).  A
``Signer`` is one such CA, kept in a directory (key 0600) and made on first use;
it issues short EC certificates for servers or clients.  The control plane
(controllers, ``cdi serve``) issues; the proxy and the workers only load files.

A ``Signer`` made here lasts ``CA_DAYS`` and issues for ``CERT_DAYS`` unless
told otherwise: that is what ``cdi serve`` uses.  On a cluster
(``cdi/cli/certrotation.py``) the CA lives in a Secret, lasts the configured
CA lifetime and is replaced near its end; ``Signer.load`` swaps it in place so
everything holding the signer issues from the newest CA, and ``bundle_pem``
carries every CA still trusted (newest first) for those who verify.  CA subjects
made by ``make_ca`` carry a subject key identifier and the leaves an authority
key identifier, so TLS stacks pick the right one of two CAs of the same name.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 825
# The name the upload server requires of its client (CDI's CLIENT_NAME).
UPLOAD_CLIENT_NAME = "client.upload-server.cdi.kubevirt.io"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes  # the certificate of the CA that issued it


def write_private(path: Path, data: bytes) -> None:
    """Write a key file readable by its owner only (created 0600, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_ca(common_name: str, *, lifetime: datetime.timedelta,
            now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A new self-signed CA valid for LIFETIME from NOW: (certificate PEM, key PEM)."""
    now = now or _utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def load_bundle(pem: bytes) -> list[x509.Certificate]:
    """The certificates in a PEM bundle ([] for none or garbage)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether CA signed CERT (names and signature)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Signer:
    """A CA kept in ``directory`` as ``ca.crt`` and ``ca.key``; made if missing.

    ``lifetime`` is the new CA's; ``leaf_lifetime`` what ``issue`` gives when not
    told; ``bundle_pem`` the CAs to trust for what it issued (its own, unless
    ``load`` says more).
    """

    def __init__(self, directory: Path, common_name: str, *,
                 lifetime: datetime.timedelta = datetime.timedelta(days=CA_DAYS),
                 leaf_lifetime: datetime.timedelta = datetime.timedelta(days=CERT_DAYS)
                 ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = directory / "ca.crt"
        self._key_path = directory / "ca.key"
        self.leaf_lifetime = leaf_lifetime
        if not (self.cert_path.exists() and self._key_path.exists()):
            cert_pem, key_pem = make_ca(common_name, lifetime=lifetime)
            write_private(self._key_path, key_pem)
            self.cert_path.write_bytes(cert_pem)
        self._read()
        self.bundle_pem = self.cert_pem

    def _read(self) -> None:
        key = serialization.load_pem_private_key(self._key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self._key_path} is not an EC private key")
        self._key = key
        self.cert_pem = self.cert_path.read_bytes()
        self.cert = x509.load_pem_x509_certificate(self.cert_pem)

    def load(self, cert_pem: bytes, key_pem: bytes, bundle_pem: bytes | None = None) -> None:
        """Become the CA in CERT_PEM/KEY_PEM (a rotated one), trusted with BUNDLE_PEM."""
        write_private(self._key_path, key_pem)
        self.cert_path.write_bytes(cert_pem)
        self._read()
        self.bundle_pem = bundle_pem or cert_pem

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    def issue(self, common_name: str, *, hosts: tuple[str, ...] = (), client: bool = False,
              days: int | None = None, lifetime: datetime.timedelta | None = None,
              now: datetime.datetime | None = None) -> Issued:
        """A new key and certificate: for a server answering ``hosts``, or a client; valid
        from NOW for LIFETIME (or DAYS, else ``leaf_lifetime``)."""
        now = now or _utcnow()
        if lifetime is None:
            lifetime = self.leaf_lifetime if days is None else datetime.timedelta(days=days)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + lifetime)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self._key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                      key_pem=_key_pem(key), ca_pem=self.cert_pem)

    def issue_files(self, directory: Path, common_name: str, *, hosts: tuple[str, ...] = (),
                    client: bool = False) -> tuple[Path, Path]:
        """Issue once into ``directory`` as tls.crt/tls.key (kept if present)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "tls.crt", directory / "tls.key"
        if not (cert.exists() and key.exists()):
            issued = self.issue(common_name, hosts=hosts, client=client)
            write_private(key, issued.key_pem)
            cert.write_bytes(issued.cert_pem)
        return cert, key
