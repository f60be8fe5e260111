"""The upload proxy on a cluster, against the fake Kubernetes API: the PKI the controller
publishes for it, its resolver's answers, and ``cdi uploadproxy`` serving with those keys
(TLS and tokens made by the test)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import socket
import ssl
import threading
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cdi.api import pki, tokens
from cdi.backends.kube import KubeStore
from cdi.cli import controller, uploadproxy
from tests.support.fakekube import FakeKube
from uploadproxy.resolver import NotReadyYet, NotUploadTarget, UploadTarget

NS = "cdi"


def publish(fake: FakeKube, tmp: Path, now: datetime.datetime | None = None) -> str:
    async def go() -> str:
        async with KubeStore(fake.config()) as store:
            server = await controller.signer(store, NS, controller.SERVER_SIGNER, tmp)
            client = await controller.signer(store, NS, controller.CLIENT_SIGNER, tmp)
            return await controller.publish_upload_pki(store, NS, server, client, tmp, now=now)
    return asyncio.run(go())


def cert_of(fake: FakeKube, name: str) -> x509.Certificate:
    secret = fake.get("Secret", name, NS)
    assert secret is not None, name
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))


def test_the_controller_publishes_the_proxys_pki(fake: FakeKube, tmp_path: Path) -> None:
    proxy_ca = publish(fake, tmp_path / "a")
    bundle = fake.get("ConfigMap", controller.SERVER_SIGNER_BUNDLE, NS)
    server_signer = cert_of(fake, controller.SERVER_SIGNER)
    assert bundle is not None and x509.load_pem_x509_certificate(
        bundle["data"]["ca-bundle.crt"].encode()) == server_signer
    client = cert_of(fake, controller.CLIENT_CERT)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        pki.UPLOAD_CLIENT_NAME
    client.verify_directly_issued_by(cert_of(fake, controller.CLIENT_SIGNER))
    served = cert_of(fake, controller.PROXY_CERT)
    served.verify_directly_issued_by(x509.load_pem_x509_certificate(proxy_ca.encode()))
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"cdi-uploadproxy.{NS}.svc" in names.get_values_for_type(x509.DNSName)
    # A second controller (or a restart) keeps what is there.
    before = {n: (fake.get("Secret", n, NS) or {})["data"]
              for n in (controller.CLIENT_CERT, controller.PROXY_CERT)}
    assert publish(fake, tmp_path / "b") == proxy_ca
    assert {n: (fake.get("Secret", n, NS) or {})["data"] for n in before} == before


def test_with_cert_manager_only_the_bundle_is_published(fake: FakeKube, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDI_CERTIFICATES", "cert-manager")
    assert publish(fake, tmp_path) == ""
    assert fake.get("ConfigMap", controller.SERVER_SIGNER_BUNDLE, NS) is not None
    assert fake.get("Secret", controller.CLIENT_CERT, NS) is None
    assert fake.get("Secret", controller.PROXY_CERT, NS) is None


def claim(fake: FakeKube, name: str, annotations: dict[str, str]) -> None:
    fake.put({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": name, "namespace": "vms", "annotations": annotations},
              "spec": {"resources": {"requests": {"storage": "1Gi"}}}})


def test_the_resolver_answers(fake: FakeKube) -> None:
    target = {uploadproxy.UPLOAD_TARGET: ""}
    claim(fake, "plain", {})
    claim(fake, "done", {**target, uploadproxy.POD_PHASE: "Succeeded"})
    claim(fake, "disk", {**target, uploadproxy.CONTENT_TYPE: "archive",
                         uploadproxy.POD_READY: "false"})

    async def go() -> list[object]:
        answers: list[object] = []
        async with KubeStore(fake.config()) as store:
            resolver = uploadproxy.KubeResolver(store)
            for pvc in ("missing", "plain", "done", "disk", "disk"):
                if answers and answers[-1] == "the upload server is not ready":
                    fake.patch("PersistentVolumeClaim", "disk", "vms", {"metadata": {
                        "annotations": {uploadproxy.POD_READY: "true"}}})
                try:
                    answers.append(await resolver.upload_server("vms", pvc))
                except (NotUploadTarget, NotReadyYet) as e:
                    answers.append(e.reason)
        return answers

    assert asyncio.run(go()) == [
        "rejecting Upload Request for PVC missing that doesn't exist",
        "PVC plain is not an upload target",
        "PVC done already finished uploading",
        "the upload server is not ready",
        UploadTarget(url="https://cdi-upload-disk.vms.svc:8443", content_type="archive")]
    # Only claims are read: all the seeds' RBAC lets the proxy read (table 1.6).
    assert {path.split("/")[-2] for _, path, _ in fake.requests} == {"persistentvolumeclaims"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_tls(fake: FakeKube, name: str, directory: Path) -> None:
    secret = fake.get("Secret", name, NS)
    assert secret is not None
    directory.mkdir(parents=True)
    for key in ("tls.crt", "tls.key"):
        (directory / key).write_bytes(base64.b64decode(secret["data"][key]))


def test_cdi_uploadproxy_serves_with_the_published_keys(fake: FakeKube, tmp_path: Path) -> None:
    proxy_ca = publish(fake, tmp_path / "pki")
    write_tls(fake, controller.PROXY_CERT, tmp_path / "server")
    write_tls(fake, controller.CLIENT_CERT, tmp_path / "client")
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = signing.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    claim(fake, "plain", {})
    port = free_port()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(uploadproxy.run(
                kubeconfig=fake.kubeconfig(tmp_path / "kc"), context=None, namespace=NS,
                address=f"127.0.0.1:{port}", server_dir=tmp_path / "server",
                client_dir=tmp_path / "client", key_pem=public_pem, stop=stop))
        except BaseException as e:
            failure.append(e)
        finally:
            loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert thread.is_alive(), failure
                threading.Event().wait(0.05)
        ctx = ssl.create_default_context(cadata=proxy_ca)
        token = tokens.issue(signing, namespace="vms", name="plain")

        async def client() -> tuple[tuple[int, str], tuple[int, str]]:
            async with aiohttp.ClientSession() as session:
                url = f"https://127.0.0.1:{port}"
                host = f"cdi-uploadproxy.{NS}.svc"
                async with session.get(url + "/healthz", ssl=ctx, server_hostname=host) as r:
                    health = (r.status, await r.text())
                async with session.post(url + "/v1beta1/upload", data=b"x", ssl=ctx,
                                        server_hostname=host,
                                        headers={"Authorization": f"Bearer {token}"}) as r:
                    refused = (r.status, await r.text())
            await asyncio.sleep(0.1)  # TLS connections finish closing
            return health, refused

        health, refused = asyncio.run(client())
        assert health[0] == 200
        assert refused == (503, "PVC plain is not an upload target")  # CDI answers 503
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
    assert failure == []


def test_an_expiring_proxy_certificate_is_renewed(fake: FakeKube, tmp_path: Path) -> None:
    """With CDI's default lifetimes the proxy's certificates last 24 h and are renewed
    12 h before their end; the one with time left is kept (the CAs last 48 h)."""
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # as certificates
    publish(fake, tmp_path / "a", now=start)
    first = cert_of(fake, controller.CLIENT_CERT)
    assert first.not_valid_after_utc - start == datetime.timedelta(hours=24)
    later = start + datetime.timedelta(hours=6)
    # The client certificate is made to end within renewBefore of LATER.
    client_ca = cert_of(fake, controller.CLIENT_SIGNER)
    fake.patch("Secret", controller.CLIENT_CERT, NS, {"data": {"tls.crt": ""}})
    kept = (fake.get("Secret", controller.PROXY_CERT, NS) or {})["data"]
    publish(fake, tmp_path / "b", now=later)
    renewed = cert_of(fake, controller.CLIENT_CERT)
    assert renewed.not_valid_after_utc - later == datetime.timedelta(hours=24)
    renewed.verify_directly_issued_by(client_ca)
    assert cert_of(fake, controller.CLIENT_SIGNER) == client_ca  # the CA is not due
    assert (fake.get("Secret", controller.PROXY_CERT, NS) or {})["data"] == kept
    # 13 h on, the proxy's serving certificate is within its renewBefore too.
    publish(fake, tmp_path / "c", now=start + datetime.timedelta(hours=13))
    assert cert_of(fake, controller.PROXY_CERT).not_valid_after_utc - start == \
        datetime.timedelta(hours=37)


def test_renewed_certificate_files_are_reloaded(tmp_path: Path) -> None:
    ca = pki.Signer(tmp_path / "ca", "test-ca")
    directory = tmp_path / "server"
    directory.mkdir()

    def write(name: str) -> None:
        issued = ca.issue(name, hosts=("127.0.0.1",))
        (directory / "tls.crt.new").write_bytes(issued.cert_pem)
        (directory / "tls.key.new").write_bytes(issued.key_pem)
        for f in ("tls.crt", "tls.key"):  # replaced, as the kubelet swaps a Secret's files
            (directory / f"{f}.new").replace(directory / f)

    async def served_name(ctx: ssl.SSLContext) -> str:
        async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()
        server = await asyncio.start_server(ignore, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(ca.cert_path))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        cert = x509.load_der_x509_certificate(der)
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    write("first")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    files = uploadproxy.CertFiles(directory, ctx)
    assert asyncio.run(served_name(ctx)) == "first"
    assert files.reload_if_changed() is False
    write("second")
    assert files.reload_if_changed() is True
    assert asyncio.run(served_name(ctx)) == "second"
    (directory / "tls.key").write_text("half written")
    assert files.reload_if_changed() is False  # a broken pair keeps the last good one
    assert asyncio.run(served_name(ctx)) == "second"
