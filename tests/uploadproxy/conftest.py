"""Fixtures for the upload proxy: a signing key, a stand-in upload server, the proxy itself."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from tests.uploadproxy.servers import DictResolver, ServerThread, Upstream, target
from uploadproxy import create_app

NAMESPACE = "ns"
PVC = "disk"


class Token(Protocol):
    def __call__(self, namespace: str = NAMESPACE, name: str = PVC, **kwargs: Any) -> str: ...


class UpstreamFactory(Protocol):
    def __call__(self, *, ssl_context: ssl.SSLContext | None = None,
                 unix: bool = False) -> tuple[Upstream, str]: ...


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def token(signing_key: rsa.RSAPrivateKey) -> Token:
    """Issue a real upload token; keyword arguments go to ``tokens.issue``."""
    def make(namespace: str = NAMESPACE, name: str = PVC, **kwargs: Any) -> str:
        return tokens.issue(kwargs.pop("key", signing_key), namespace=namespace, name=name,
                            **kwargs)
    return make


@pytest.fixture
def make_upstream(tmp_path: Path) -> Iterator[UpstreamFactory]:
    """Start stand-in upload servers; each call returns ``(upstream, base_url)``."""
    servers: list[ServerThread] = []

    def start(*, ssl_context: ssl.SSLContext | None = None,
              unix: bool = False) -> tuple[Upstream, str]:
        spool = tmp_path / f"upstream{len(servers)}"
        spool.mkdir()
        upstream = Upstream(spool)
        sockets = tmp_path / "s"
        sockets.mkdir(mode=0o700, exist_ok=True)
        server = ServerThread(upstream.app(), ssl_context=ssl_context,
                              name=f"upstream{len(servers)}",
                              unix_path=sockets / f"{len(servers)}.sock" if unix else None
                              ).start()
        servers.append(server)
        return upstream, server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["tcp", "unix"])
def upstream(make_upstream: UpstreamFactory, request: pytest.FixtureRequest
             ) -> tuple[Upstream, str]:
    """A stand-in upload server on 127.0.0.1 (the aiohttp client, as on a cluster) or on a
    Unix socket (the proxy's own pump, as in cdi serve); the URL is ``unix:<path>`` then."""
    return make_upstream(unix=request.param == "unix")


@pytest.fixture
def resolver(upstream: tuple[Upstream, str]) -> DictResolver:
    """Knows ns/disk, served by ``upstream``, ready at once."""
    resolver = DictResolver()
    resolver.set(NAMESPACE, PVC, target(upstream[1]))
    return resolver


@pytest.fixture
def make_proxy(signing_key: rsa.RSAPrivateKey,
               resolver: DictResolver) -> Iterator[Callable[..., str]]:
    """Start upload proxies; keyword arguments go to ``create_app``; returns the base URL."""
    servers: list[ServerThread] = []

    def start(**kwargs: Any) -> str:
        kwargs.setdefault("public_key", signing_key.public_key())
        kwargs.setdefault("resolver", resolver)
        kwargs.setdefault("ready_interval", 0.05)
        kwargs.setdefault("ready_timeout", 2.0)
        server = ServerThread(create_app(**kwargs), name="proxy").start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., str]) -> str:
    return make_proxy()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
