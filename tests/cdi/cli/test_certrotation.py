"""Generated CAs and certificates within their configured lifetimes, against the fake
Kubernetes API with a clock the tests set: CAs replaced near their end with the old one
kept in the bundle until it expires, leaves renewed ``renewBefore`` ahead from the newest
CA, and lifetimes that cannot work refused by name."""

from __future__ import annotations

import asyncio
import base64
import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from cdi.api import certconfig, pki
from cdi.api.certconfig import CertConfig, CertConfigError, Lifetime
from cdi.backends.kube import KubeStore
from cdi.cli import certrotation, controller
from cdi.cli.main import main
from cdi.controllers.datavolume import UploadTLS
from tests.support.fakekube import FakeKube

NS = "cdi"
H = datetime.timedelta(hours=1)
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def secret_cert(fake: FakeKube, name: str) -> x509.Certificate:
    secret = fake.get("Secret", name, NS)
    assert secret is not None, name
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))


def bundle(fake: FakeKube, name: str) -> list[x509.Certificate]:
    cm = fake.get("ConfigMap", name, NS)
    assert cm is not None, name
    return x509.load_pem_x509_certificates(cm["data"]["ca-bundle.crt"].encode())


def put_ca(fake: FakeKube, name: str, *, made: datetime.datetime,
           lifetime: datetime.timedelta) -> x509.Certificate:
    cert_pem, key_pem = pki.make_ca(f"{name}@old", lifetime=lifetime, now=made)
    fake.put({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": name, "namespace": NS},
              "data": {"tls.crt": base64.b64encode(cert_pem).decode(),
                       "tls.key": base64.b64encode(key_pem).decode()}})
    return x509.load_pem_x509_certificate(cert_pem)


def signer_at(fake: FakeKube, tmp: Path, name: str, now: datetime.datetime, *,
              lifetime: Lifetime = certconfig.DEFAULT_CA,
              into: pki.Signer | None = None) -> pki.Signer:
    async def go() -> pki.Signer:
        async with KubeStore(fake.config()) as store:
            return await certrotation.signer(store, NS, name, tmp, lifetime=lifetime, now=now,
                                             into=into)
    return asyncio.run(go())


def rotate_at(fake: FakeKube, tmp: Path, now: datetime.datetime, certs: CertConfig,
              server: pki.Signer, client: pki.Signer) -> certrotation.Published:
    async def go() -> certrotation.Published:
        async with KubeStore(fake.config()) as store:
            return await certrotation.rotate_upload_pki(store, NS, server, client, tmp,
                                                        certs=certs, now=now)
    return asyncio.run(go())


def test_a_ca_near_its_end_is_replaced_and_the_old_one_stays_in_the_bundle(
        fake: FakeKube, tmp_path: Path) -> None:
    name = controller.SERVER_SIGNER
    held = signer_at(fake, tmp_path, name, T0)
    first = secret_cert(fake, name)
    assert (first.not_valid_before_utc, first.not_valid_after_utc) == (
        T0 - datetime.timedelta(minutes=5), T0 + 48 * H)
    assert bundle(fake, f"{name}-bundle") == [first]
    # Before renewBefore (24 h) of the end: kept.
    signer_at(fake, tmp_path, name, T0 + 23 * H, into=held)
    assert secret_cert(fake, name) == first
    # Within it: a new CA, the holder's signer swapped in place, both in the bundle.
    upload_tls = UploadTLS(signer=held, client_signer=held)
    signer_at(fake, tmp_path, name, T0 + 25 * H, into=held)
    second = secret_cert(fake, name)
    assert second != first
    assert (second.not_valid_before_utc, second.not_valid_after_utc) == (
        T0 + 25 * H - datetime.timedelta(minutes=5), T0 + 73 * H)
    assert second.subject != first.subject  # two CAs, two names: TLS finds the right one
    assert bundle(fake, f"{name}-bundle") == [second, first]
    assert x509.load_pem_x509_certificates(upload_tls.client_ca_pem) == [second, first]
    leaf = x509.load_pem_x509_certificate(held.issue("cdi-upload-x").cert_pem)
    leaf.verify_directly_issued_by(second)
    # Once the old CA has expired it leaves the bundle.
    signer_at(fake, tmp_path, name, T0 + 48 * H + datetime.timedelta(seconds=1), into=held)
    assert bundle(fake, f"{name}-bundle") == [second]
    assert secret_cert(fake, name) == second


@pytest.mark.parametrize("made", [T0 - 47 * H, T0 - 100 * H], ids=["near-its-end", "expired"])
def test_a_found_ca_that_is_due_is_replaced(fake: FakeKube, tmp_path: Path,
                                            made: datetime.datetime) -> None:
    old = put_ca(fake, controller.PROXY_SIGNER, made=made, lifetime=48 * H)
    ca = signer_at(fake, tmp_path, controller.PROXY_SIGNER, T0)
    new = secret_cert(fake, controller.PROXY_SIGNER)
    assert new != old and new.not_valid_after_utc == T0 + 48 * H
    assert x509.load_pem_x509_certificate(ca.cert_pem) == new
    expected = [new, old] if old.not_valid_after_utc > T0 else [new]  # expired: dropped
    assert bundle(fake, f"{controller.PROXY_SIGNER}-bundle") == expected


def test_an_unreadable_ca_is_replaced(fake: FakeKube, tmp_path: Path) -> None:
    fake.put({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": controller.CLIENT_SIGNER, "namespace": NS},
              "data": {"tls.crt": base64.b64encode(b"garbage").decode()}})
    signer_at(fake, tmp_path, controller.CLIENT_SIGNER, T0)
    assert secret_cert(fake, controller.CLIENT_SIGNER).not_valid_after_utc == T0 + 48 * H


def test_leaves_follow_the_configured_lifetimes(fake: FakeKube, tmp_path: Path) -> None:
    certs = CertConfig.parse(ca_duration="10h", ca_renew_before="4h", server_duration="3h",
                             server_renew_before="1h30m")
    server = signer_at(fake, tmp_path, controller.SERVER_SIGNER, T0, lifetime=certs.ca)
    client = signer_at(fake, tmp_path, controller.CLIENT_SIGNER, T0, lifetime=certs.ca)
    published = rotate_at(fake, tmp_path, T0, certs, server, client)
    proxy_ca = secret_cert(fake, controller.PROXY_SIGNER)
    assert proxy_ca.not_valid_after_utc == T0 + 10 * H
    for name in (controller.PROXY_CERT, controller.CLIENT_CERT):
        assert secret_cert(fake, name).not_valid_after_utc == T0 + 3 * H
    assert published.next_due == T0 + 90 * datetime.timedelta(minutes=1)
    assert x509.load_pem_x509_certificates(published.proxy_ca.encode()) == [proxy_ca]
    # Upload servers' certificates last the server duration too.
    upload = x509.load_pem_x509_certificate(server.issue("cdi-upload-x", now=T0).cert_pem)
    assert upload.not_valid_after_utc == T0 + 3 * H

    first = {n: secret_cert(fake, n) for n in (controller.PROXY_CERT, controller.CLIENT_CERT)}
    rotate_at(fake, tmp_path, T0 + 89 * datetime.timedelta(minutes=1), certs, server, client)
    assert {n: secret_cert(fake, n) for n in first} == first  # not due yet
    at = T0 + 90 * datetime.timedelta(minutes=1)
    rotate_at(fake, tmp_path, at, certs, server, client)
    for name in first:
        renewed = secret_cert(fake, name)
        assert renewed != first[name] and renewed.not_valid_after_utc == at + 3 * H

    # 6 h on, the CAs are within their 4 h: new CAs, bundles with both, leaves from new ones.
    old_server_ca = secret_cert(fake, controller.SERVER_SIGNER)
    at = T0 + 6 * H
    published = rotate_at(fake, tmp_path, at, certs, server, client)
    new_proxy_ca = secret_cert(fake, controller.PROXY_SIGNER)
    assert x509.load_pem_x509_certificates(published.proxy_ca.encode()) == [
        new_proxy_ca, proxy_ca]
    new_server_ca = secret_cert(fake, controller.SERVER_SIGNER)
    assert new_server_ca != old_server_ca
    assert bundle(fake, controller.SERVER_SIGNER_BUNDLE) == [new_server_ca, old_server_ca]
    secret_cert(fake, controller.PROXY_CERT).verify_directly_issued_by(new_proxy_ca)
    client_cert = secret_cert(fake, controller.CLIENT_CERT)
    client_cert.verify_directly_issued_by(secret_cert(fake, controller.CLIENT_SIGNER))
    ca_crt = base64.b64decode((fake.get("Secret", controller.CLIENT_CERT, NS) or {})
                              ["data"]["ca.crt"])
    assert len(x509.load_pem_x509_certificates(ca_crt)) == 2


def test_a_leaf_from_a_ca_no_longer_trusted_is_reissued(fake: FakeKube,
                                                         tmp_path: Path) -> None:
    certs = CertConfig()
    server = signer_at(fake, tmp_path, controller.SERVER_SIGNER, T0)
    client = signer_at(fake, tmp_path, controller.CLIENT_SIGNER, T0)
    rotate_at(fake, tmp_path, T0, certs, server, client)
    stranger = pki.Signer(tmp_path / "stranger", "stranger")
    issued = stranger.issue(pki.UPLOAD_CLIENT_NAME, client=True, now=T0)
    fake.patch("Secret", controller.CLIENT_CERT, NS, {"data": {
        "tls.crt": base64.b64encode(issued.cert_pem).decode()}})
    rotate_at(fake, tmp_path, T0 + H, certs, server, client)
    cert = secret_cert(fake, controller.CLIENT_CERT)
    cert.verify_directly_issued_by(secret_cert(fake, controller.CLIENT_SIGNER))
    assert cert.not_valid_after_utc == T0 + 25 * H


def test_the_rotation_loop_publishes_a_rotated_proxy_ca(fake: FakeKube,
                                                         tmp_path: Path) -> None:
    certs = CertConfig()
    server = signer_at(fake, tmp_path, controller.SERVER_SIGNER, T0)
    client = signer_at(fake, tmp_path, controller.CLIENT_SIGNER, T0)
    published = rotate_at(fake, tmp_path, T0, certs, server, client)
    assert published.next_due == T0 + 12 * H
    seen: list[str] = []

    async def go() -> None:
        async with KubeStore(fake.config()) as store:
            looping = asyncio.ensure_future(certrotation.keep_rotating(
                store, NS, server, client, tmp_path, certs=certs, due=published.next_due,
                on_proxy_ca=seen.append, clock=lambda: T0 + 25 * H))
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            looping.cancel()
            await asyncio.gather(looping, return_exceptions=True)
    asyncio.run(go())
    assert len(x509.load_pem_x509_certificates(seen[0].encode())) == 2
    assert secret_cert(fake, controller.SERVER_SIGNER).not_valid_after_utc == T0 + 73 * H


def test_the_wait_honours_short_lifetimes() -> None:
    defaults = CertConfig()
    assert defaults.max_check == 6 * H  # half the server's 12 h renewBefore
    assert certrotation.wait_for(T0 + 100 * H, defaults, T0) == 6 * 3600
    assert certrotation.wait_for(T0 + datetime.timedelta(seconds=90), defaults, T0) == 90
    assert certrotation.wait_for(T0 - H, defaults, T0) == 1  # overdue: look again soon
    long = CertConfig.parse(ca_duration="8760h", ca_renew_before="720h",
                            server_duration="2160h", server_renew_before="720h")
    assert long.max_check == 12 * H


@pytest.mark.parametrize(("values", "message"), [
    (("48h", "48h", "24h", "12h"),
     'certificates.ca.renewBefore: "48h" must be shorter than certificates.ca.duration "48h"'),
    (("48h0m0s", "24h0m0s", "24h", "36h"),
     'certificates.server.renewBefore: "36h" must be shorter than '
     'certificates.server.duration "24h"'),
    (("two days", "24h", "24h", "12h"),
     'certificates.ca.duration: invalid duration "two days" (use e.g. 48h0m0s)'),
    (("48h", "24h", "24h", "12"),
     'certificates.server.renewBefore: invalid duration "12" (use e.g. 48h0m0s)'),
    (("48h", "24h", "0s", "12h"), 'certificates.server.duration: "0s" must be longer than 0s'),
    (("48h", "-1h", "24h", "12h"),
     'certificates.ca.renewBefore: "-1h" must be longer than 0s'),
])
def test_lifetimes_that_cannot_work_are_refused(values: tuple[str, str, str, str],
                                                message: str) -> None:
    with pytest.raises(CertConfigError) as caught:
        CertConfig.parse(ca_duration=values[0], ca_renew_before=values[1],
                         server_duration=values[2], server_renew_before=values[3])
    assert str(caught.value) == message


def test_go_durations_parse() -> None:
    parse = certconfig.parse_duration
    assert parse("48h0m0s", setting="x") == 48 * H
    assert parse("1h30m", setting="x") == 90 * datetime.timedelta(minutes=1)
    assert parse("1.5h", setting="x") == 90 * datetime.timedelta(minutes=1)
    assert parse("2160h", setting="x") == datetime.timedelta(days=90)
    assert certconfig.format_duration(48 * H) == "48h0m0s"


@pytest.mark.parametrize("command", ["controller", "apiserver"])
def test_the_commands_refuse_bad_lifetimes(command: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDI_CA_DURATION", "24h")
    monkeypatch.setenv("CDI_CA_RENEW_BEFORE", "24h0m0s")
    result = CliRunner().invoke(main, [command])
    assert result.exit_code == 1, result.output
    assert result.output == ('Error: certificates.ca.renewBefore: "24h0m0s" must be shorter '
                             'than certificates.ca.duration "24h"\n')
    monkeypatch.delenv("CDI_CA_DURATION")
    monkeypatch.delenv("CDI_CA_RENEW_BEFORE")
    result = CliRunner().invoke(main, [command, "--server-duration", "1d"])
    assert result.exit_code == 1, result.output
    assert 'certificates.server.duration: invalid duration "1d"' in result.output


def test_the_controller_keeps_its_cas_in_the_configured_lifetimes(
        fake: FakeKube, tmp_path: Path) -> None:
    """``cdi controller`` at start: CAs made for ``certs.ca``, a proxy CA near its end
    replaced, and CDIConfig ``status.uploadProxyCA`` publishing old and new."""
    now = datetime.datetime.now(datetime.UTC)
    old = put_ca(fake, controller.PROXY_SIGNER, made=now - 70 * H, lifetime=72 * H)
    certs = CertConfig.parse(ca_duration="72h", ca_renew_before="12h", server_duration="6h",
                             server_renew_before="1h")
    options = controller.Options(kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"),
                                 identity="replica-1", lease_duration=1.0,
                                 renew_deadline=0.8, retry_period=0.1, certs=certs)

    async def scenario() -> str:
        stop = asyncio.Event()
        running = asyncio.ensure_future(controller.run(options, stop))
        try:
            for _ in range(400):
                status = ((await asyncio.to_thread(fake.get, "CDIConfig", "config")) or {}
                          ).get("status") or {}
                if status.get("uploadProxyCA"):
                    return str(status["uploadProxyCA"])
                await asyncio.sleep(0.05)
            raise AssertionError("no uploadProxyCA published")
        finally:
            stop.set()
            await asyncio.wait_for(running, 10)

    published = x509.load_pem_x509_certificates(asyncio.run(scenario()).encode())
    new = secret_cert(fake, controller.PROXY_SIGNER)
    assert published == [new, old]
    for name in (controller.PROXY_SIGNER, controller.SERVER_SIGNER, controller.CLIENT_SIGNER):
        ca = secret_cert(fake, name)
        assert ca.not_valid_after_utc - ca.not_valid_before_utc == 72 * H + \
            datetime.timedelta(minutes=5)
    served = secret_cert(fake, controller.PROXY_CERT)
    served.verify_directly_issued_by(new)
    assert served.not_valid_after_utc - served.not_valid_before_utc == 6 * H + \
        datetime.timedelta(minutes=5)
