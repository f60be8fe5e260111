"""The signers: made once and kept, and what they issue is what TLS expects."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdi.api import pki


def test_signer_is_made_once_and_kept(tmp_path: Path) -> None:
    first = pki.Signer(tmp_path / "ca", "test-ca")
    again = pki.Signer(tmp_path / "ca", "test-ca")
    assert first.cert_pem == again.cert_pem
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600


def test_server_and_client_certificates(tmp_path: Path) -> None:
    signer = pki.Signer(tmp_path / "ca", "test-ca")
    server = signer.issue("cdi-upload-x", hosts=("127.0.0.1", "cdi-upload-x.ns.svc"))
    client = signer.issue(pki.UPLOAD_CLIENT_NAME, client=True)
    s_cert = x509.load_pem_x509_certificate(server.cert_pem)
    c_cert = x509.load_pem_x509_certificate(client.cert_pem)
    san = s_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in san] == ["127.0.0.1", "cdi-upload-x.ns.svc"]
    assert list(s_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(c_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert server.ca_pem == signer.cert_pem
    # ssl accepts the pair and the chain.
    (tmp_path / "k.pem").write_bytes(server.key_pem)
    (tmp_path / "c.pem").write_bytes(server.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    ctx.load_verify_locations(cafile=str(signer.cert_path))


def test_issue_files_keeps_what_it_issued(tmp_path: Path) -> None:
    signer = pki.Signer(tmp_path / "ca", "test-ca")
    cert, key = signer.issue_files(tmp_path / "client", "c", client=True)
    before = cert.read_bytes()
    assert signer.issue_files(tmp_path / "client", "c", client=True) == (cert, key)
    assert cert.read_bytes() == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
