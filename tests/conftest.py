"""Shared fixtures: TLS material and real HTTP(S) file servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.httpserver import FileServer
from tests.support.proxy import ForwardProxy
from tests.support.tls import TLSFiles, make_ca, write_tls_files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1/localhost, written to a temp dir."""
    return write_tls_files(tmp_path_factory.mktemp("tls"), make_ca())


def _serve(root: Path, tls: TLSFiles | None) -> Iterator[FileServer]:
    server = FileServer(root, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors == [], "file server handler crashed:\n" + "\n".join(server.errors)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[FileServer]:
    """A started plain-HTTP :class:`FileServer` over the empty ``tmp_path / "www"``."""
    yield from _serve(tmp_path / "www", None)


@pytest.fixture
def https_server(tmp_path: Path, tls_files: TLSFiles) -> Iterator[FileServer]:
    """Like ``http_server`` but over TLS with the ``tls_files`` certificate."""
    yield from _serve(tmp_path / "www-tls", tls_files)


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    """A started tinyproxy on 127.0.0.1; ``requests()`` lists what went through it."""
    proxy = ForwardProxy(tmp_path / "proxy").start()
    try:
        yield proxy
    finally:
        proxy.stop()
