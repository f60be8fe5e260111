"""The upload server's Unix socket (``LISTEN_SOCKET``): plain HTTP for our own user only.

The server keeps its TCP port with mutual TLS; the socket is a second way in,
0600 in a 0700 directory.  Uploads go through it with ``http.client`` over
AF_UNIX and are checked with qemu-img; settings that would expose the socket
are refused before the server listens.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme

from importer import qemu_img
from importer.upload import localsocket
from tests.importer.conftest import Volume
from tests.support import images
from tests.support.tls import TLSFiles, write_tls_files

MiB = 1 << 20
CLIENT_NAME = "client.upload-server.cdi.kubevirt.io"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(self._path))


def _post(path: Path, target: str, body: Path | bytes) -> tuple[int, str]:
    conn = UnixHTTPConnection(path)
    try:
        if isinstance(body, Path):
            with body.open("rb") as f:
                conn.request("POST", target, body=f, headers={
                    "Content-Length": str(body.stat().st_size)})
                answer = conn.getresponse()
        else:
            conn.request("POST", target, body=body)
            answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSFiles, Path]:
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("tls")
    files = write_tls_files(root, ca)
    client = root / "client.pem"
    ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME).private_key_and_cert_chain_pem \
        .write_to_path(str(client))
    return files, client


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    return d


class Started:
    def __init__(self, proc: subprocess.Popen[bytes], vol: Volume, log: Path) -> None:
        self.proc, self.vol, self.log = proc, vol, log
        self.address = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def termination(self) -> str:
        return self.vol.termination_log.read_text() if self.vol.termination_log.exists() else ""


@pytest.fixture
def start(volume: Callable[..., Volume], tls: tuple[TLSFiles, Path]
          ) -> Iterator[Callable[..., Started]]:
    """An upload server with mutual TLS on 127.0.0.1 and the environment given."""
    procs: list[subprocess.Popen[bytes]] = []
    files, _ = tls

    def go(*, wait: bool = True, **env: str) -> Started:
        vol = volume()
        address = vol.root / "address"
        full = dict(os.environ) | vol.env() | {
            "LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "0", "UPLOAD_ADDRESS_FILE": str(address),
            "UPLOAD_IMAGE_SIZE": "128Mi", "TLS_CERT_FILE": str(files.server_cert),
            "TLS_KEY_FILE": str(files.server_key), "CLIENT_CERT_FILE": str(files.ca_cert),
            "CLIENT_NAME": CLIENT_NAME} | env
        log = vol.root / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "importer.uploadserver"], env=full,
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        started = Started(proc, vol, log)
        if wait:
            deadline = time.monotonic() + 15
            while not address.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the upload server did not start:\n{log.read_text()}")
                time.sleep(0.02)
            started.address = address.read_text().strip()
        return started

    yield go
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_upload_over_the_socket_while_tcp_keeps_mutual_tls(
        tmp_path: Path, start: Callable[..., Started], private_dir: Path,
        tls: tuple[TLSFiles, Path]) -> None:
    raw = images.make_raw(tmp_path / "disk.raw", virtual_size=48 * MiB,
                          extents=[(0, 3 * MiB), (30 * MiB, 5 * MiB)], seed=3)
    sock = private_dir / "u.sock"
    server = start(LISTEN_SOCKET=str(sock))
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    files, _ = tls
    # The TCP port still wants a client certificate: no TLS session without one.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://{server.address}/healthz", verify=str(files.ca_cert), timeout=10)
    # Through the socket no certificate is needed, and CLIENT_NAME does not apply.
    assert _post(sock, "/v1beta1/upload", raw) == (200, "")
    assert server.proc.wait(timeout=30) == 0, server.output()
    assert json.loads(server.termination)["message"] == "Upload Complete"
    assert qemu_img.compare(str(raw), str(server.vol.disk))
    assert images.allocated_bytes(server.vol.disk) <= 9 * MiB, "zeros were not written"
    assert 'client=local "POST /v1beta1/upload HTTP/1.1" 200' in server.output()
    assert not sock.exists(), "the server removes its socket when it exits"


def test_one_upload_at_a_time_across_both_listeners(
        tmp_path: Path, start: Callable[..., Started], private_dir: Path,
        tls: tuple[TLSFiles, Path]) -> None:
    sock = private_dir / "u.sock"
    server = start(LISTEN_SOCKET=str(sock))
    files, client = tls
    # A body that never ends holds the upload on the socket ...
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.connect(str(sock))
    busy.sendall(b"POST /v1beta1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
                 + bytes(MiB))
    try:
        deadline = time.monotonic() + 10
        while True:  # ... and the TCP port, with the right certificate, is told so
            with requests.get(f"https://{server.address}/v1beta1/upload-offset",
                              verify=str(files.ca_cert), cert=(str(client), str(client)),
                              timeout=10) as r:
                if r.json()["inProgress"]:
                    break
            assert time.monotonic() < deadline, "the socket upload never started"
            time.sleep(0.05)
        with requests.post(f"https://{server.address}/v1beta1/upload", data=b"x" * 1000,
                           verify=str(files.ca_cert), cert=(str(client), str(client)),
                           timeout=10) as r:
            assert (r.status_code, r.text) == (503, "Upload already in progress")
    finally:
        busy.close()


@pytest.mark.parametrize(("case", "text"), [
    ("open-dir", "is mode 755: a socket's directory must be 0700, private to its user"),
    ("relative", "'u.sock' is not an absolute path"),
    ("too-long", "is longer than a Unix socket path may be (107 bytes)"),
    ("no-dir", "No such file or directory"),
    ("symlink-dir", "is not a directory"),
])
def test_exposed_or_impossible_sockets_are_refused(start: Callable[..., Started],
                                                   tmp_path: Path, case: str,
                                                   text: str) -> None:
    opened = tmp_path / "open"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    private = tmp_path / "p"
    private.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(private)
    value = {
        "open-dir": str(opened / "u.sock"),
        "relative": "u.sock",
        "too-long": str(private / ("x" * 120)),
        "no-dir": str(tmp_path / "missing" / "u.sock"),
        "symlink-dir": str(tmp_path / "link" / "u.sock"),
    }[case]
    server = start(wait=False, LISTEN_SOCKET=value)
    assert server.proc.wait(timeout=30) == 1
    assert server.termination.startswith("Invalid settings: LISTEN_SOCKET: "), server.termination
    assert text in server.termination
    assert not (opened / "u.sock").exists()


def test_stale_socket_of_a_killed_server_is_replaced(start: Callable[..., Started],
                                                    private_dir: Path, tmp_path: Path) -> None:
    sock = private_dir / "u.sock"
    stale = localsocket.bind(sock)  # bound, never listening: what a kill -9 leaves
    stale.close()
    assert sock.exists()
    server = start(LISTEN_SOCKET=str(sock))
    raw = images.make_raw(tmp_path / "d.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    assert _post(sock, "/v1beta1/upload", raw) == (200, "")
    assert server.proc.wait(timeout=30) == 0, server.output()


def test_a_regular_file_in_the_way_is_not_removed(start: Callable[..., Started],
                                                  private_dir: Path) -> None:
    path = private_dir / "u.sock"
    path.write_text("not a socket")
    server = start(wait=False, LISTEN_SOCKET=str(path))
    assert server.proc.wait(timeout=30) == 1
    assert server.termination.startswith(f"Invalid settings: LISTEN_SOCKET: cannot listen on "
                                         f"{path}: "), server.termination
    assert path.read_text() == "not a socket"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_peer_of_another_user_is_refused(start: Callable[..., Started]) -> None:
    """Even if the socket's permissions were opened up after the start, a peer running as
    another user (SO_PEERCRED) gets no answer; our own user still does."""
    d = Path(tempfile.mkdtemp(prefix="cdi-sock-"))  # not under pytest's 0700 tree
    try:
        sock = d / "u.sock"
        server = start(LISTEN_SOCKET=str(sock))
        d.chmod(0o755)
        sock.chmod(0o666)
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS",
             "--unix-socket", str(sock), "http://localhost/healthz"],
            capture_output=True, text=True, timeout=30, check=False)
        assert other.returncode != 0 and other.stdout == "", other
        assert "REFUSED local connection of uid 65534: not our user" in server.output()
        ours = subprocess.run(["curl", "-sS", "--unix-socket", str(sock),
                               "http://localhost/healthz"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert (ours.returncode, ours.stdout) == (0, "OK"), ours
    finally:
        shutil.rmtree(d, ignore_errors=True)
