"""Fixtures: a started API server over a real SQLiteStore, and an HTTP session to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.cdi.apiserver.harness import TOKEN, ApiServer, auth


class Api:
    """``requests`` against one server, authenticated unless told otherwise."""

    def __init__(self, url: str, token: str = TOKEN) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers.update(auth(token))

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url + path, **kwargs)

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """Start servers (each over its own database); all are stopped at teardown."""
    servers: list[ApiServer] = []

    def make(**kwargs: Any) -> ApiServer:
        server = ApiServer(tmp_path / f"db{len(servers)}.sqlite", **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ApiServer]) -> ApiServer:
    return make_server()


@pytest.fixture
def api(server: ApiServer) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()
