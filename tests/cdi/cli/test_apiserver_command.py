"""``cdi apiserver`` against the fake Kubernetes API: the signing key and serving CA it keeps
in Secrets, the CA bundles it writes, and the upload API and webhooks it then serves
(front-proxy certificates made by the test; SubjectAccessReviews answered by the fake)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import pki, tokens
from cdi.api.certconfig import CertConfig
from cdi.backends.kube import KubeStore
from cdi.cli import apiserver, certrotation
from cdi.cli.main import main
from tests.support.fakekube import FakeKube

NS = "cdi"
UPLOAD = "upload.cdi.kubevirt.io"
HOST = "cdi-api.cdi.svc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def front_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cluster(front_ca: trustme.CA) -> Iterator[FakeKube]:
    fake = FakeKube(namespace=NS).start()
    fake.access_review = lambda spec: (
        {"allowed": True} if spec.get("user") == "alice" else
        {"allowed": False, "reason": "no RBAC policy matched"})
    fake.put({"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "extension-apiserver-authentication",
                           "namespace": "kube-system"},
              "data": {"requestheader-client-ca-file": front_ca.cert_pem.bytes().decode(),
                       "requestheader-allowed-names": '["front-proxy-client"]',
                       "requestheader-username-headers": '["X-Remote-User"]',
                       "requestheader-group-headers": '["X-Remote-Group"]',
                       "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]'}})
    fake.put({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
              "metadata": {"name": f"v1beta1.{UPLOAD}"},
              "spec": {"group": UPLOAD, "version": "v1beta1",
                       "service": {"name": "cdi-api", "namespace": NS}}})
    for kind, name in (("ValidatingWebhookConfiguration", "cdi-api-datavolume-validate"),
                       ("MutatingWebhookConfiguration", "cdi-api-datavolume-mutate")):
        fake.put({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                  "metadata": {"name": name},
                  "webhooks": [{"name": f"{name}.cdi.kubevirt.io",
                                "clientConfig": {"service": {"name": "cdi-api",
                                                             "namespace": NS}}}]})
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.errors == []


class Running:
    """``apiserver.run`` in a thread of its own, stopped like SIGTERM stops it."""

    def __init__(self, fake: FakeKube, tmp: Path) -> None:
        self.port = free_port()
        self.kubeconfig = fake.kubeconfig(tmp / "kubeconfig")
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def go() -> None:
            self.stop_event = asyncio.Event()
            await apiserver.run(kubeconfig=self.kubeconfig, context=None, namespace=NS,
                                address=f"127.0.0.1:{self.port}", certificates="generate",
                                cert_dir=Path("/nonexistent"),
                                stop=self.stop_event)
        try:
            self.loop.run_until_complete(go())
        except BaseException as e:  # reported by stop()
            self.error = e
        finally:
            self.loop.close()

    def start(self) -> Running:
        self.thread.start()
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if not self.thread.is_alive():
                    break
                threading.Event().wait(0.05)
        raise AssertionError(f"cdi apiserver did not listen: {self.error!r}")

    def stop(self) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=30)
        assert self.error is None, repr(self.error)


def client_context(ca_pem: bytes, front_ca: trustme.CA | None, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    if front_ca is not None:
        leaf = front_ca.issue_cert(common_name="front-proxy-client")
        cert, key = tmp / "front.pem", tmp / "front.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def post(port: int, path: str, body: Any, ctx: ssl.SSLContext,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            f"https://127.0.0.1:{port}{path}", json=body, ssl=ctx, server_hostname=HOST,
            headers=headers or {}) as r:
        answer = r.status, await r.json()
    await asyncio.sleep(0.1)  # TLS connections finish closing (else: ResourceWarning later)
    return answer


def ca_bundle(fake: FakeKube) -> bytes:
    service = fake.get("APIService", f"v1beta1.{UPLOAD}")
    assert service is not None
    return base64.b64decode(service["spec"]["caBundle"])


def test_generate_mode_serves_with_its_own_ca(cluster: FakeKube, front_ca: trustme.CA,
                                              tmp_path: Path) -> None:
    server = Running(cluster, tmp_path).start()
    try:
        ca = ca_bundle(cluster)
        signer = cluster.get("Secret", "cdi-apiserver-signer", NS)
        assert signer is not None and base64.b64decode(signer["data"]["tls.crt"]) == ca
        for kind, name in (("ValidatingWebhookConfiguration", "cdi-api-datavolume-validate"),
                           ("MutatingWebhookConfiguration", "cdi-api-datavolume-mutate")):
            hooks = (cluster.get(kind, name) or {})["webhooks"]
            assert [base64.b64decode(h["clientConfig"]["caBundle"]) for h in hooks] == [ca]
        key_secret = cluster.get("Secret", "cdi-api-signing-key", NS)
        assert key_secret is not None
        public = serialization.load_pem_public_key(
            base64.b64decode(key_secret["data"]["id_rsa.pub"]))
        assert isinstance(public, rsa.RSAPublicKey)

        ctx = client_context(ca, front_ca, tmp_path)
        request = {"apiVersion": f"{UPLOAD}/v1beta1", "kind": "UploadTokenRequest",
                   "metadata": {"name": "t"}, "spec": {"pvcName": "disk"}}
        path = f"/apis/{UPLOAD}/v1beta1/namespaces/team/uploadtokenrequests"
        status, answer = asyncio.run(post(server.port, path, request, ctx,
                                          {"X-Remote-User": "alice"}))
        assert status == 200, answer
        claims = tokens.verify(public, answer["status"]["token"])
        tokens.check(claims, operation=tokens.UPLOAD, namespace="team", name="disk")
        status, answer = asyncio.run(post(server.port, path, request, ctx,
                                          {"X-Remote-User": "bob"}))
        assert (status, answer["message"]) == (
            401, 'User "bob" cannot create resource "uploadtokenrequests" in API group '
                 '"upload.cdi.kubevirt.io" in the namespace "team": no RBAC policy matched')
        sar = [r for r in cluster.requests if r[1].endswith("/subjectaccessreviews")]
        assert len(sar) == 2

        # The webhook is served on the same listener, without a client certificate.
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": "u1", "operation": "CREATE", "namespace": "team",
                              "resource": {"group": "cdi.kubevirt.io", "version": "v1beta1",
                                           "resource": "datavolumes"},
                              "userInfo": {"username": "bob"},
                              "object": {"apiVersion": "cdi.kubevirt.io/v1beta1",
                                         "kind": "DataVolume",
                                         "metadata": {"name": "d", "namespace": "team"},
                                         "spec": {"source": {"pvc": {
                                             "name": "golden", "namespace": "os-images"}},
                                             "storage": {}}}}}
        status, answer = asyncio.run(post(server.port, "/datavolume-mutate", review,
                                          client_context(ca, None, tmp_path)))
        assert status == 200
        assert answer["response"]["status"]["message"] == (
            " User bob has insufficient permissions in clone source namespace os-images")
    finally:
        server.stop()

    # A restart keeps the key and the CA: tokens and trust survive it.
    again = Running(cluster, tmp_path).start()
    try:
        assert ca_bundle(cluster) == ca
        secret = cluster.get("Secret", "cdi-api-signing-key", NS)
        assert secret is not None and secret["data"] == key_secret["data"]
    finally:
        again.stop()


def test_without_the_front_proxy_configuration_it_says_so(cluster: FakeKube,
                                                          tmp_path: Path) -> None:
    cluster.patch("ConfigMap", "extension-apiserver-authentication", "kube-system",
                  {"data": {"requestheader-client-ca-file": None}})
    result = CliRunner().invoke(main, [
        "apiserver", "--kubeconfig", str(cluster.kubeconfig(tmp_path / "kc")),
        "--namespace", NS, "--address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 1, result.output
    assert "requestheader-client-ca-file: the front proxy is not configured" in result.output
    # The signing key is made first; it is kept for the next, configured start.
    assert cluster.get("Secret", "cdi-api-signing-key", NS) is not None


async def served_cert(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)  # TLS connections finish closing (else: ResourceWarning later)
    return x509.load_der_x509_certificate(der)


def test_a_signer_near_its_end_is_rotated_and_both_cas_are_trusted(
        cluster: FakeKube, tmp_path: Path) -> None:
    """A CA 30 h into its 48 h (within renewBefore 24 h) is replaced at start; the caBundle
    keeps the old one beside the new, and the serving certificate (24 h, CDI's default)
    comes from the new CA."""
    now = datetime.datetime.now(datetime.UTC)
    old_pem, old_key = pki.make_ca("cdi-apiserver-signer@old", lifetime=datetime.timedelta(
        hours=48), now=now - datetime.timedelta(hours=30))
    cluster.put({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": {"name": apiserver.SIGNER, "namespace": NS},
                 "data": {"tls.crt": base64.b64encode(old_pem).decode(),
                          "tls.key": base64.b64encode(old_key).decode()}})
    server = Running(cluster, tmp_path).start()
    try:
        signer = cluster.get("Secret", apiserver.SIGNER, NS)
        assert signer is not None
        new = x509.load_pem_x509_certificate(base64.b64decode(signer["data"]["tls.crt"]))
        old = x509.load_pem_x509_certificate(old_pem)
        assert new != old
        assert new.not_valid_after_utc - new.not_valid_before_utc == \
            datetime.timedelta(hours=48, minutes=5)
        assert x509.load_pem_x509_certificates(ca_bundle(cluster)) == [new, old]
        hooks = (cluster.get("ValidatingWebhookConfiguration", "cdi-api-datavolume-validate")
                 or {})["webhooks"]
        assert base64.b64decode(hooks[0]["clientConfig"]["caBundle"]) == ca_bundle(cluster)
        bundle_cm = cluster.get("ConfigMap", "cdi-apiserver-signer-bundle", NS)
        assert bundle_cm is not None
        assert bundle_cm["data"]["ca-bundle.crt"].encode() == ca_bundle(cluster)
        served = asyncio.run(served_cert(server.port, ssl.create_default_context(
            cadata=ca_bundle(cluster).decode())))
        served.verify_directly_issued_by(new)
        assert served.not_valid_after_utc - served.not_valid_before_utc == \
            datetime.timedelta(hours=24, minutes=5)
    finally:
        server.stop()


def test_the_serving_certificate_is_renewed_before_its_end(cluster: FakeKube,
                                                           tmp_path: Path) -> None:
    """``Serving.refresh`` on a set clock: kept until renewBefore of its end, then
    re-issued; a CA rotation writes the bundle of both CAs into the registrations."""
    certs = CertConfig.parse(ca_duration="10h", ca_renew_before="4h", server_duration="2h",
                             server_renew_before="30m")
    t0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    minute = datetime.timedelta(minutes=1)

    async def go() -> list[tuple[bytes, datetime.datetime]]:
        async with KubeStore(cluster.config()) as store:
            ca = await certrotation.signer(store, NS, apiserver.SIGNER, tmp_path,
                                           lifetime=certs.ca, now=t0)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            serving = apiserver.Serving(ctx, tmp_path, ca, NS, certs=certs)
            seen = []
            for at in (t0, t0 + 89 * minute, t0 + 90 * minute, t0 + 6 * 60 * minute):
                due = await serving.refresh(store, at)
                seen.append((serving.cert_pem, due))
            return seen

    seen = asyncio.run(go())
    first, kept, renewed, rotated = (x509.load_pem_x509_certificate(p) for p, _ in seen)
    assert first.not_valid_after_utc == t0 + datetime.timedelta(hours=2)
    assert seen[0][1] == t0 + 90 * datetime.timedelta(minutes=1)
    assert kept == first
    assert renewed != first
    assert renewed.not_valid_after_utc == t0 + datetime.timedelta(hours=3, minutes=30)
    # At 6 h the CA (10 h, renewBefore 4 h) was replaced; both are in the caBundle.
    cas = x509.load_pem_x509_certificates(ca_bundle(cluster))
    assert len(cas) == 2 and cas[0].not_valid_after_utc == t0 + datetime.timedelta(hours=16)
    # The serving certificate had passed its renewal: re-issued, from the newest CA.
    rotated.verify_directly_issued_by(cas[0])
    assert rotated.not_valid_after_utc == t0 + datetime.timedelta(hours=8)
    assert seen[3][1] == t0 + datetime.timedelta(hours=7, minutes=30)
