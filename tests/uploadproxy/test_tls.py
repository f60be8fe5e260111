"""Mutual TLS to the upload server: it requires our client certificate, we verify its own."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
import requests
import trustme

from tests.uploadproxy.conftest import NAMESPACE, PVC, Token, UpstreamFactory
from tests.uploadproxy.servers import DictResolver, Upstream
from uploadproxy import UploadTarget

CLIENT_NAME = "client.upload-server.cdi.kubevirt.io"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(ca: trustme.CA, make_upstream: UpstreamFactory,
                 resolver: DictResolver) -> tuple[Upstream, str]:
    """An HTTPS upload server for 127.0.0.1 that demands a client certificate from ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    upstream, url = make_upstream(ssl_context=context)
    resolver.set(NAMESPACE, PVC, UploadTarget(url))
    return upstream, url


def _client_context(ca: trustme.CA, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    if with_cert:
        ca.issue_cert(common_name=CLIENT_NAME).configure_cert(context)
    return context


def _post(http: requests.Session, proxy: str, token: str) -> requests.Response:
    return http.post(f"{proxy}/v1beta1/upload", data=b"z" * 300_000,
                     headers={"Authorization": f"Bearer {token}"})


def test_mutual_tls_upload(make_proxy: Callable[..., str], tls_upstream: tuple[Upstream, str],
                           ca: trustme.CA, http: requests.Session, token: Token) -> None:
    assert tls_upstream[1].startswith("https://127.0.0.1:")
    proxy = make_proxy(client_ssl=_client_context(ca, with_cert=True))
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (200, "upload ok")
    [seen] = tls_upstream[0].seen
    assert seen.complete and seen.size == 300_000
    assert seen.peer_cn == CLIENT_NAME


def test_without_a_client_certificate_is_502(make_proxy: Callable[..., str],
                                             tls_upstream: tuple[Upstream, str],
                                             ca: trustme.CA, http: requests.Session,
                                             token: Token) -> None:
    proxy = make_proxy(client_ssl=_client_context(ca, with_cert=False))
    response = _post(http, proxy, token())
    assert response.status_code == 502
    assert "upload server for ns/disk" in response.text
    assert tls_upstream[0].seen == []


def test_without_client_ssl_the_upstream_is_not_trusted(make_proxy: Callable[..., str],
                                                         tls_upstream: tuple[Upstream, str],
                                                         http: requests.Session,
                                                         token: Token) -> None:
    response = _post(http, make_proxy(), token())
    assert (response.status_code, response.text) == (
        502, "cannot reach the upload server for ns/disk")
    assert tls_upstream[0].seen == []


def test_an_upstream_certificate_from_another_ca_is_refused(
        make_proxy: Callable[..., str], tls_upstream: tuple[Upstream, str],
        http: requests.Session, token: Token) -> None:
    other = trustme.CA()
    proxy = make_proxy(client_ssl=_client_context(other, with_cert=True))
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (
        502, "cannot reach the upload server for ns/disk")
    assert tls_upstream[0].seen == []
