"""A real `cdi serve` in a subprocess, driven through its REST API and the `cdi` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from cdi.api.kinds import lookup
from tests.support import xfs
from tests.support.registry import Registry


class Server:
    """`cdi serve` on 127.0.0.1 with its own data dir and config home."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.args = args
        self.data_dir = root / "data"
        self.env = dict(os.environ)
        self.env.update({"XDG_CONFIG_HOME": str(root / "config"),
                         "CDI_DATA_DIR": str(self.data_dir)})
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.url = ""

    def start(self) -> Server:
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdi.cli.main", "serve", "--address", "127.0.0.1:0",
             "--restart-backoff", "0.2", *self.args],
            env=self.env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cdi serve did not start:\n" + self.log())
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.url = data["url"]
        token = Path(data["token_file"]).read_text().strip()
        self.session.headers["Authorization"] = f"Bearer {token}"
        return self

    def log(self) -> str:
        p = self.root / "serve.log"
        return p.read_text(errors="replace")[-5000:] if p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # -- REST helpers --------------------------------------------------------------

    def path(self, kind: str, name: str | None = None, namespace: str = "default") -> str:
        return self.url + lookup(kind).path(namespace, name)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        r = self.session.get(self.path(kind, name, namespace), timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def create(self, obj: dict[str, Any] | str) -> requests.Response:
        if isinstance(obj, str):
            obj = yaml.safe_load(obj)
        assert isinstance(obj, dict)
        ns = obj["metadata"].get("namespace", "default")
        return self.session.post(self.path(obj["kind"], None, ns), json=obj, timeout=10)

    def wait_for(self, kind: str, name: str, predicate: Any, timeout: float = 60,
                 namespace: str = "default") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self.session.get(self.path(kind, name, namespace), timeout=10)
            if r.status_code == 200:
                last = r.json()
                if predicate(last):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {kind}/{name}; last: "
                             f"{json.dumps(last.get('status'), indent=1)}\n{self.log()}")

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["cdi", *args], env=self.env, capture_output=True, text=True,
                              input=input, timeout=120, check=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "serve").start()
    try:
        yield s
    finally:
        s.session.close()
        s.stop()


def phase(obj: dict[str, Any]) -> str:
    return str(obj.get("status", {}).get("phase", ""))


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == ctype:
            return dict(c)
    return {}


@pytest.fixture
def reflink_server(tmp_path: Path) -> Iterator[Server]:
    """`cdi serve` with the local-reflink class on an XFS loop mount made for the test."""
    with xfs.xfs(tmp_path / "fs") as mnt:
        s = Server(tmp_path / "serve", "--reflink-root", str(mnt)).start()
        try:
            yield s
        finally:
            s.session.close()
            s.stop()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """Debian's docker-registry on 127.0.0.1, plain HTTP."""
    reg = Registry(tmp_path / "registry").start()
    try:
        yield reg
    finally:
        reg.stop()
