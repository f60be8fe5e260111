"""Fixtures: a real API server in a thread, and the real `cdi` command pointed at it.

The command runs as a subprocess with its own ``XDG_CONFIG_HOME`` and
``CDI_DATA_DIR`` in temp dirs, so it finds the server the way it would after
``cdi serve``: through the files ``config.write_server_info`` writes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdi.cli import config
from tests.cdi.apiserver.conftest import Api
from tests.cdi.apiserver.harness import TOKEN, ApiServer
from tests.support.fakekube import FakeKube


class Cluster:
    """The server, an HTTP session to set up state, and ``cdi`` to run against it."""

    def __init__(self, server: ApiServer, root: Path) -> None:
        self.server = server
        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.api = Api(server.url)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")}
        self.env.update(XDG_CONFIG_HOME=str(root / "config"), CDI_DATA_DIR=str(self.data_dir),
                        PYTHONUNBUFFERED="1")

    def cdi(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["cdi", *args], input=input, capture_output=True, text=True,
                              env=env or self.env, timeout=timeout, check=False)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["cdi", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def post(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        r = self.api("POST", path, json=obj)
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result

    def set_status(self, path: str, status: dict[str, Any]) -> dict[str, Any]:
        r = self.api("PATCH", path + "/status", json={"status": status},
                     headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    logs = tmp_path / "logs"
    server = ApiServer(tmp_path / "db.sqlite",
                       pod_logs=lambda ns, name: logs / ns / f"{name}.log").start()
    c = Cluster(server, tmp_path)
    try:
        c.data_dir.mkdir()
        token_file = c.data_dir / "api-token"
        token_file.write_text(TOKEN + "\n")
        monkeypatch.setenv("XDG_CONFIG_HOME", c.env["XDG_CONFIG_HOME"])
        config.write_server_info(c.data_dir, server.url, token_file)
        yield c
    finally:
        c.api.close()
        server.stop()


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    """A Kubernetes API stand-in whose namespace is "cdi" (the commands' own)."""
    server = FakeKube(namespace="cdi").start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors == []
