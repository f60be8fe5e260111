"""The embedded control plane's PKI, kept in the data dir and made on first start.

Three signers, as in CDI: the upload proxy's CA (its serving certificate; the
CA is published in CDIConfig ``status.uploadProxyCA`` so ``cdi image-upload``
and ``virtctl`` verify the proxy without ``--insecure``), the upload-server
signer (each upload server gets its own serving certificate from it, issued by
the DataVolume controller) and the upload-server client signer (the proxy's
client certificate, which every upload server requires: mutual TLS).
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from cdi.api import pki


@dataclasses.dataclass(frozen=True)
class UploadPKI:
    proxy_ca: Path  # the CA clients trust for the proxy
    proxy_cert: Path
    proxy_key: Path
    server_signer: pki.Signer  # issues upload-server serving certificates
    client_signer: pki.Signer  # issued the proxy's client certificate
    client_cert: Path
    client_key: Path

    def proxy_server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.proxy_cert), str(self.proxy_key))
        return ctx

    def proxy_client_context(self) -> ssl.SSLContext:
        """How the proxy reaches upload servers: their signer only, with its client cert."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.server_signer.cert_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def ensure(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
           ) -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) for the upload proxy, made if missing."""
    signer = pki.Signer(directory, "cdi-serve-ca")
    cert, key = signer.issue_files(directory, "cdi-uploadproxy", hosts=hosts)
    return signer.cert_path, cert, key


def upload_pki(data_dir: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
               ) -> UploadPKI:
    proxy_ca, proxy_cert, proxy_key = ensure(data_dir / "uploadproxy", hosts=hosts)
    server_signer = pki.Signer(data_dir / "uploadserver-signer", "cdi-uploadserver-signer")
    client_dir = data_dir / "uploadserver-client-signer"
    client_signer = pki.Signer(client_dir, "cdi-uploadserver-client-signer")
    client_cert, client_key = client_signer.issue_files(
        client_dir / "client", pki.UPLOAD_CLIENT_NAME, client=True)
    return UploadPKI(proxy_ca=proxy_ca, proxy_cert=proxy_cert, proxy_key=proxy_key,
                     server_signer=server_signer, client_signer=client_signer,
                     client_cert=client_cert, client_key=client_key)
