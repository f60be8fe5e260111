"""Host-assisted clone as the pods run it: both workers as real processes, mutual TLS.

The target is ``python -m importer.uploadserver`` in clone mode
(``UPLOAD_CLONE=true``) with a trustme server certificate, requiring a client
certificate from the clone CA that names ``CLIENT_NAME``; the source is
``python -m importer.clonesource`` with that client certificate.  A "block
device" is a raw file passed as ``IMPORTER_BLOCK_PATH`` (and once a real loop
device).  Content is checked with qemu-img compare, sparseness with
``st_blocks``, and what went over the wire with the source's termination
message and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme

from importer import qemu_img
from importer.upload import clone, sparse
from tests.importer.conftest import Volume
from tests.support import images

MiB = 1 << 20
GiB = 1 << 30
CLIENT_NAME = "default/source-disk-default/target-disk"  # CDI's <srcNs>/<src>-<tgtNs>/<tgt>
NO_CAPACITY = ("Saving stream failed: effective image size is larger than the reported "
               "available storage: virtual image size 134217728 is larger than the reported "
               "available storage 33554432")
DONE = {"message": "Clone Complete", "preallocationApplied": False}
# 64 MiB: 7 MiB of data (images.STANDARD_EXTENTS) and 4 MiB of allocated zeros at 20 MiB.
STD_DATA = images.STANDARD_DATA_BYTES
STD_ZEROS = (20 * MiB, 4 * MiB)
# 8 GiB virtual, 200 MiB of data in 5 extents across it, and 16 MiB of allocated zeros.
BIG_EXTENTS = [(i * 1600 * MiB + 3 * MiB, 40 * MiB) for i in range(5)]
BIG_ZEROS = (7 * GiB, 16 * MiB)
BIG_DATA = 200 * MiB
# 128 MiB, 48 MiB of data: more than the socket buffers hold while a cut is held.
MID_EXTENTS = [(0, 16 * MiB), (40 * MiB, 16 * MiB), (100 * MiB, 16 * MiB)]
MID_DATA = 48 * MiB


# --- certificates and images --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path  # signs the upload server's certificate and the clone client certificates
    server: Path  # key and chain, for 127.0.0.1
    client: Path  # key and chain, CN = CLIENT_NAME
    other_name: Path  # same CA, another name
    stranger: Path  # another CA, CN = CLIENT_NAME
    stranger_ca: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("clone-certs")
    ca, other = trustme.CA(), trustme.CA()

    def write(name: str, blob: trustme.Blob) -> Path:
        blob.write_to_path(str(root / name))
        return root / name

    return Certs(
        ca=write("ca.pem", ca.cert_pem),
        server=write("server.pem",
                     ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem),
        client=write("client.pem", ca.issue_cert(
            "clone-source", common_name=CLIENT_NAME).private_key_and_cert_chain_pem),
        other_name=write("other.pem", ca.issue_cert(
            "someone", common_name="default/other-default/target-disk"
        ).private_key_and_cert_chain_pem),
        stranger=write("stranger.pem", other.issue_cert(
            "clone-source", common_name=CLIENT_NAME).private_key_and_cert_chain_pem),
        stranger_ca=write("stranger-ca.pem", other.cert_pem),
    )


def _zeros(path: Path, offset: int, length: int) -> None:
    """Write zeros: allocated, but nothing a sparse clone needs to send."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


@pytest.fixture(scope="module")
def std(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<dir>/disk.img, 64 MiB: 7 MiB of data, 4 MiB of allocated zeros, holes."""
    disk = images.make_raw(tmp_path_factory.mktemp("clone-std") / "disk.img",
                           virtual_size=images.STANDARD_VIRTUAL_SIZE,
                           extents=images.STANDARD_EXTENTS, seed=5)
    _zeros(disk, *STD_ZEROS)
    assert images.allocated_bytes(disk) == STD_DATA + STD_ZEROS[1]
    return disk


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = images.make_raw(tmp_path_factory.mktemp("clone-big") / "disk.img",
                           virtual_size=8 * GiB, extents=BIG_EXTENTS, seed=9)
    _zeros(disk, *BIG_ZEROS)
    return disk


@pytest.fixture(scope="module")
def mid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.make_raw(tmp_path_factory.mktemp("clone-mid") / "disk.img",
                           virtual_size=128 * MiB, extents=MID_EXTENTS, seed=11)


# --- the workers --------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    proc: subprocess.Popen[bytes]
    vol: Volume
    log: Path
    address: str

    @property
    def url(self) -> str:
        return f"https://{self.address}/v1beta1/upload"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def termination(self) -> str:
        path = self.vol.termination_log
        return path.read_text() if path.exists() else ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def completed(self, **expected: object) -> None:
        assert self.proc.wait(timeout=30) == 0, self.output()
        assert json.loads(self.termination) == DONE | expected

    def waiting(self) -> None:
        """Still up, nothing completed, nothing left on the volume."""
        assert self.proc.poll() is None, self.output()
        assert not self.vol.termination_log.exists()
        if not self.vol.block:
            assert not self.vol.disk.exists()


StartTarget = Callable[..., Target]


@pytest.fixture
def start_target(volume: Callable[..., Volume], certs: Certs) -> Iterator[StartTarget]:
    """Start an upload server in clone mode (by default) on a volume, with mutual TLS."""
    procs: list[subprocess.Popen[bytes]] = []

    def go(vol: Volume | None = None, *, port: int = 0, **env: str) -> Target:
        vol = vol or volume()
        address_file = vol.root / "address"
        address_file.unlink(missing_ok=True)
        full = dict(os.environ) | vol.env() | {
            "LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": str(port),
            "UPLOAD_ADDRESS_FILE": str(address_file), "UPLOAD_IMAGE_SIZE": "128Mi",
            "UPLOAD_CLONE": "true", "TLS_CERT_FILE": str(certs.server),
            "TLS_KEY_FILE": str(certs.server), "CLIENT_CERT_FILE": str(certs.ca),
            "CLIENT_NAME": CLIENT_NAME,
        } | env
        log = vol.root / f"target-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "importer.uploadserver"], env=full,
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 15
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the upload server did not start:\n{log.read_text()}")
            time.sleep(0.02)
        return Target(proc, vol, log, address_file.read_text().strip())

    yield go
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@dataclasses.dataclass
class Source:
    proc: subprocess.Popen[str]
    termination_log: Path

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit code, termination message, log."""
        _, err = self.proc.communicate(timeout=timeout)
        log = self.termination_log
        return self.proc.returncode, log.read_text() if log.exists() else "", err


StartSource = Callable[..., Source]


@pytest.fixture
def start_source(tmp_path: Path, certs: Certs) -> Iterator[StartSource]:
    """Start the clone source on DISK (a block device if BLOCK, else <dir>/disk.img)."""
    procs: list[subprocess.Popen[str]] = []

    def go(disk: Path, url: str, *, block: bool = False, cert: Path | None = None,
           ca: Path | None = None, **env: str) -> Source:
        termination = tmp_path / f"source-termination-{len(procs)}"
        full = dict(os.environ) | {
            "UPLOAD_URL": url,
            "IMPORTER_BLOCK_PATH": str(disk if block else tmp_path / "no-block-device"),
            "CLONE_SOURCE_DIR": str(disk.parent if not block else tmp_path / "no-dir"),
            "CLIENT_CERT_FILE": str(cert or certs.client),
            "CLIENT_KEY_FILE": str(cert or certs.client),
            "SERVER_CA_FILE": str(ca or certs.ca),
            "IMPORTER_TERMINATION_LOG": str(termination),
            "IMPORTER_METRICS_ADDRESS": "",
            "IMPORTER_RETRIES": "2",
            "IMPORTER_RETRY_BACKOFF": "0.05",
            "OWNER_UID": "uid-1",
        } | env
        proc = subprocess.Popen([sys.executable, "-m", "importer.clonesource"], env=full,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return Source(proc, termination)

    yield go
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _cloned(source: Source, *, allocated: int, sent: int,
            attempts: range = range(1, 2)) -> dict[str, int]:
    code, message, log = source.finish()
    assert code == 0, log
    result: dict[str, int] = json.loads(message)
    assert result.pop("message") == "Clone Complete"  # type: ignore[comparison-overlap]
    assert result["allocatedBytes"] == allocated
    assert result["attempts"] in attempts, log
    # Frame data plus framing: 12 bytes per frame and the chunk lines, a few KiB at most.
    assert sent <= result["bytesSent"] <= sent + 64 * 1024, result
    return result


def _same(a: Path, b: Path) -> None:
    assert qemu_img.compare(str(a), str(b)), f"{b} differs from {a}"


def _sparse(disk: Path, data: int) -> None:
    allocated = images.allocated_bytes(disk)
    assert data <= allocated <= data * 1.05 + MiB, f"{allocated} bytes allocated for {data}"


def _scribble(path: Path, offsets: list[int]) -> None:
    """Old content where the clone has holes: it must read as zeros afterwards."""
    with path.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(b"\xab" * MiB)


# --- volume modes -------------------------------------------------------------------


@pytest.mark.parametrize(("source_block", "target_block"),
                         [(False, False), (False, True), (True, False), (True, True)],
                         ids=["fs-fs", "fs-block", "block-fs", "block-block"])
def test_clone(std: Path, start_target: StartTarget, start_source: StartSource,
               volume: Callable[..., Volume], source_block: bool, target_block: bool) -> None:
    vol = volume(block=target_block, block_size=96 * MiB)
    if target_block:
        _scribble(vol.disk, [5 * MiB, 30 * MiB, 80 * MiB])  # 80: past the image
    else:
        vol.disk.write_bytes(b"\xab" * (3 * MiB))  # an earlier attempt's leftovers
    target = start_target(vol)
    source = start_source(std, target.url, block=source_block)
    _cloned(source, allocated=STD_DATA + STD_ZEROS[1], sent=STD_DATA)
    target.completed()
    _same(std, vol.disk)  # a larger block device: the rest must read as zeros
    _sparse(vol.disk, STD_DATA)
    assert vol.disk.stat().st_size == (96 * MiB if target_block else 64 * MiB)
    if not target_block:
        assert sorted(p.name for p in vol.data_dir.iterdir()) == ["disk.img"]


def test_real_block_device_source(std: Path, start_target: StartTarget,
                                  start_source: StartSource) -> None:
    """A loop device has no SEEK_DATA: all of it is read, and zeros are skipped as read."""
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(std)],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        target = start_target()
        source = start_source(Path(device), target.url, block=True)
        _cloned(source, allocated=images.STANDARD_VIRTUAL_SIZE, sent=STD_DATA)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    target.completed()
    _same(std, target.vol.disk)
    _sparse(target.vol.disk, STD_DATA)


def test_sparse_8g(big: Path, start_target: StartTarget, start_source: StartSource) -> None:
    target = start_target(UPLOAD_IMAGE_SIZE="9Gi")
    source = start_source(big, target.url)
    result = _cloned(source, allocated=BIG_DATA + BIG_ZEROS[1], sent=BIG_DATA)
    assert result["virtualSize"] == 8 * GiB
    target.completed()
    disk = target.vol.disk
    assert disk.stat().st_size == 8 * GiB
    _sparse(disk, BIG_DATA)
    _same(big, disk)


@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
def test_preallocation(std: Path, start_target: StartTarget, start_source: StartSource,
                       volume: Callable[..., Volume], block: bool) -> None:
    vol = volume(block=block, block_size=96 * MiB)
    target = start_target(vol, PREALLOCATION="true")
    _cloned(start_source(std, target.url), allocated=STD_DATA + STD_ZEROS[1], sent=STD_DATA)
    target.completed(preallocationApplied=True)
    _same(std, vol.disk)
    size = vol.disk.stat().st_size
    assert size == (96 * MiB if block else 64 * MiB)
    assert images.allocated_bytes(vol.disk) >= size


# --- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
def test_target_too_small(mid: Path, start_target: StartTarget, start_source: StartSource,
                          volume: Callable[..., Volume], block: bool) -> None:
    vol = volume(block=block, block_size=32 * MiB)
    target = start_target(vol, UPLOAD_IMAGE_SIZE="32Mi")
    code, message, log = start_source(mid, target.url).finish()
    assert code == 1, log
    assert message == f"Unable to clone data: the upload server answered 400 Bad Request: " \
                      f"{NO_CAPACITY}. A larger PVC is required"
    # The answer came after the server's 16 MiB drain, while the source was still sending.
    assert "ANSWER early" in log
    assert "RETRY" not in log
    target.waiting()
    if block:
        assert images.allocated_bytes(vol.disk) == 0


def _post(target: Target, certs: Certs, body: bytes, *, cert: Path | None = None,
          content_type: str | None = clone.CONTENT_TYPE, path: str = "") -> tuple[int, str]:
    headers = {clone.HEADER: content_type} if content_type else {}
    with requests.Session() as session:
        session.trust_env = False
        client = str(cert or certs.client)
        with session.post(target.url + path, data=body, headers=headers, verify=str(certs.ca),
                          cert=(client, client), timeout=30) as r:
            return r.status_code, r.text


def _frame(offset: int, data: bytes) -> bytes:
    return sparse.FRAME.pack(offset, len(data)) + data


SIZE = 64 * MiB
HEAD = sparse.encode_head(SIZE)
END = sparse.encode_end(SIZE)
DATA = b"\x5a" * 4096
MALFORMED = {
    "magic": (b"NOTCLONE" + HEAD[8:] + END, "bad magic b'NOTCLONE'"),
    "version": (sparse.HEAD.pack(sparse.MAGIC, 2, 0, SIZE) + END,
                "version 2 is not supported"),
    "flags": (sparse.HEAD.pack(sparse.MAGIC, 1, 4, SIZE) + END, "unknown flags 0x4"),
    "short-header": (HEAD[:10], "the stream ended inside the stream header"),
    "beyond-end": (HEAD + _frame(SIZE - 2048, DATA) + END,
                   "frame 1 [67106816, 67110912) ends beyond the image size 67108864"),
    "overlap": (HEAD + _frame(0, DATA) + _frame(2048, DATA) + END,
                "frame 2 at offset 2048 overlaps or precedes the previous one, which ends at "
                "4096"),
    "out-of-order": (HEAD + _frame(MiB, DATA) + _frame(0, DATA) + END,
                     "frame 2 at offset 0 overlaps or precedes"),
    "truncated": (HEAD + _frame(0, DATA)[:1000], "the stream ended inside frame 1 (offset 0)"),
    "no-end-frame": (HEAD + _frame(0, DATA), "the stream ended after frame 1 (offset 4096), "
                                             "before its end frame"),
    "end-frame": (HEAD + _frame(0, DATA) + sparse.encode_end(SIZE - 1),
                  "the end frame says offset 67108863, expected the image size 67108864"),
    "after-end": (HEAD + _frame(0, DATA) + END + b"x", "data after the end frame"),
}


def test_malformed_streams(std: Path, start_target: StartTarget, start_source: StartSource,
                           certs: Certs) -> None:
    """Each is a 400 naming the fault, and leaves nothing; then a good clone still works."""
    target = start_target()
    for name, (body, reason) in MALFORMED.items():
        status, text = _post(target, certs, body)
        assert (status, name) == (400, name), text
        assert text.startswith("Saving stream failed: malformed clone stream: "), text
        assert reason in text, (name, text)
        target.waiting()
    status, text = _post(target, certs, HEAD + END, path="-async")
    assert (status, text) == (400, "a sparse-clone stream goes to /v1beta1/upload")
    status, text = _post(target, certs, HEAD + END, path="?offset=0")
    assert (status, text) == (400, "a clone cannot continue at an offset: it starts again "
                                   "from byte 0")
    # A clone server takes no upload, and CDI's snappy clone streams are not spoken.
    status, text = _post(target, certs, std.read_bytes()[:MiB], content_type=None)
    assert status == 400
    assert "this upload server is in clone mode: it takes only a clone" in text
    status, text = _post(target, certs, b"x", content_type="filesystem-clone")
    assert status == 400
    assert "filesystem-clone (CDI's snappy clone stream) is not supported" in text
    target.waiting()
    _cloned(start_source(std, target.url), allocated=STD_DATA + STD_ZEROS[1], sent=STD_DATA)
    target.completed()
    _same(std, target.vol.disk)


def test_certificates(std: Path, start_target: StartTarget, start_source: StartSource,
                      certs: Certs) -> None:
    target = start_target()
    # A client certificate from another CA: the server refuses the TLS session.
    code, message, log = start_source(std, target.url, cert=certs.stranger).finish()
    assert code == 1, log
    assert message.startswith("Unable to clone data: the upload server refused the TLS "
                              "session"), message
    assert "is the client certificate (CLIENT_CERT_FILE) one it trusts?" in message
    assert "RETRY" not in log  # a refused certificate is not a dropped connection
    # The right CA, but not the name the target expects (CDI: 401).
    code, message, _ = start_source(std, target.url, cert=certs.other_name).finish()
    assert code == 1
    assert message == ("Unable to clone data: the upload server answered 401 Unauthorized: "
                       f"client certificate is not issued to {CLIENT_NAME}")
    # A server we do not trust.
    code, message, _ = start_source(std, target.url, ca=certs.stranger_ca).finish()
    assert code == 1
    assert message.startswith("Unable to clone data: the upload server's certificate is not "
                              "trusted: "), message
    target.waiting()
    assert "TLS handshake failed" in target.output() or "certificate" in target.output()


def test_target_not_in_clone_mode(std: Path, start_target: StartTarget,
                                  start_source: StartSource) -> None:
    target = start_target(UPLOAD_CLONE="false")
    code, message, _ = start_source(std, target.url).finish()
    assert code == 1
    assert message == ("Unable to clone data: the upload server answered 400 Bad Request: "
                       "x-cdi-content-type: sparse-clone refused: this upload server is not in "
                       "clone mode (a clone needs an upload server started for it, with "
                       "UPLOAD_CLONE=true)")
    target.waiting()


@pytest.mark.parametrize(("env", "text"), [
    ({"UPLOAD_URL": "ftp://127.0.0.1/v1beta1/upload"},
     "Invalid settings: UPLOAD_URL: 'ftp://127.0.0.1/v1beta1/upload' is not an "
     "https://host[:port]/path URL"),
    ({"UPLOAD_URL": "http://10.0.0.1:8443/v1beta1/upload"},
     "Invalid settings: UPLOAD_URL: refusing to send a volume over plain HTTP beyond "
     "loopback: use https://"),
    ({"CLIENT_KEY_FILE": ""},
     "Invalid settings: CLIENT_KEY_FILE: a client certificate needs CLIENT_CERT_FILE and "
     "CLIENT_KEY_FILE"),
    ({"CLONE_SOURCE_DIR": "/nonexistent"},
     "Unable to clone data: no source volume: neither the block device "),
], ids=["scheme", "plain-http", "half-a-certificate", "no-source"])
def test_source_refuses_to_start(std: Path, start_source: StartSource, env: dict[str, str],
                                 text: str) -> None:
    code, message, log = start_source(std, "https://127.0.0.1:1/v1beta1/upload", **env).finish()
    assert code == 1, log
    assert message.startswith(text), message


# --- the local Unix socket (cdi serve) ----------------------------------------------


_NO_TLS = {"CLIENT_CERT_FILE": "", "CLIENT_KEY_FILE": "", "SERVER_CA_FILE": ""}


@pytest.mark.parametrize("target_block", [False, True], ids=["fs", "block"])
def test_clone_over_the_unix_socket(std: Path, start_target: StartTarget,
                                    start_source: StartSource, volume: Callable[..., Volume],
                                    tmp_path: Path, target_block: bool) -> None:
    """UPLOAD_SOCKET: plain HTTP to the target's LISTEN_SOCKET, no certificate at all, and
    the same stream, sparse copy and answer as over mutual TLS."""
    sockets = tmp_path / "s"
    sockets.mkdir(mode=0o700)
    vol = volume(block=target_block, block_size=96 * MiB)
    if target_block:
        _scribble(vol.disk, [5 * MiB, 30 * MiB])
    target = start_target(vol, LISTEN_SOCKET=str(sockets / "t.sock"))
    # UPLOAD_URL names a port nobody listens on: only the socket can be used.
    source = start_source(std, "https://127.0.0.1:1/v1beta1/upload",
                          UPLOAD_SOCKET=str(sockets / "t.sock"), **_NO_TLS)
    result = _cloned(source, allocated=STD_DATA + STD_ZEROS[1], sent=STD_DATA)
    assert result["attempts"] == 1
    target.completed()
    _same(std, vol.disk)
    _sparse(vol.disk, STD_DATA)
    assert 'client=local "POST /v1beta1/upload HTTP/1.1" 200' in target.output()


def test_clone_socket_refusal_is_final(std: Path, start_target: StartTarget,
                                       start_source: StartSource, volume: Callable[..., Volume],
                                       tmp_path: Path) -> None:
    sockets = tmp_path / "s"
    sockets.mkdir(mode=0o700)
    target = start_target(volume(), LISTEN_SOCKET=str(sockets / "t.sock"),
                          UPLOAD_IMAGE_SIZE="16Mi")
    code, message, log = start_source(std, "", UPLOAD_SOCKET=str(sockets / "t.sock"),
                                      **_NO_TLS).finish()
    assert code == 1, log
    assert message.startswith("Unable to clone data: the upload server answered 400 Bad "
                              "Request: Saving stream failed: effective image size is larger "
                              "than the reported available storage"), message
    target.waiting()


@pytest.mark.parametrize(("case", "text"), [
    ("open-dir", "Invalid settings: UPLOAD_SOCKET: "),
    ("nobody-listens", "Unable to clone data: sending to unix:"),
])
def test_clone_source_socket_checks(std: Path, start_source: StartSource, tmp_path: Path,
                                    case: str, text: str) -> None:
    d = tmp_path / "sockets"
    d.mkdir(mode=0o700)
    if case == "open-dir":
        d.chmod(0o777)  # anyone could have put a socket there: it proves nothing
    code, message, log = start_source(std, "", UPLOAD_SOCKET=str(d / "t.sock"),
                                      **_NO_TLS).finish()
    assert code == 1, log
    assert message.startswith(text), message
    if case == "open-dir":
        assert message.endswith("is mode 777: a socket's directory must be 0700, private to "
                                "its user")
    else:
        assert "failed after 3 attempts: cannot connect to unix:" in message


# --- dropped connections ------------------------------------------------------------


class Relay:
    """127.0.0.1:<port> -> the target; the first connection is cut after CUT_AFTER bytes up.

    At the cut the relay holds the connection (``paused`` is set) until ``go``,
    calls ``on_cut``, then resets both sides.
    """

    def __init__(self, backend_port: int, cut_after: int) -> None:
        self.backend_port = backend_port
        self.cut_after = cut_after
        self.cuts = 0
        self.paused = threading.Event()
        self.go = threading.Event()
        self.on_cut: Callable[[], object] = lambda: None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._listener.getsockname()[1]}/v1beta1/upload"

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            backend.settimeout(None)
            self._sockets += [client, backend]
            cut = self.cuts == 0
            self.cuts += cut
            self._spawn(self._pump, client, backend, cut)
            self._spawn(self._pump, backend, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, cut: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if cut and sent + len(data) >= self.cut_after:
                    dst.sendall(data[: self.cut_after - sent])
                    self.paused.set()
                    self.go.wait(30)
                    self.on_cut()
                    _reset(src)
                    _reset(dst)
                    return
                dst.sendall(data)
                sent += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in [self._listener, *self._sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, like a dropped connection.

    SHUT_RD first wakes the other pump, blocked in recv on this socket: until
    it lets go, close() cannot release the socket and the reset is not sent.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}\{{ownerUID="uid-1"\}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} not in\n{text}"
    return float(m.group(1))


@pytest.mark.parametrize("how", ["cut", "target-killed"])
def test_dropped_connection(mid: Path, start_target: StartTarget, start_source: StartSource,
                            tmp_path: Path, how: str) -> None:
    """The source starts again from byte 0; the target too, even after a restart."""
    target = start_target()
    relay = Relay(target.port, cut_after=12 * MiB)
    metrics = tmp_path / "metrics-address"
    try:
        source = start_source(mid, relay.url, IMPORTER_RETRIES="6",
                              IMPORTER_RETRY_BACKOFF="0.2",
                              IMPORTER_METRICS_ADDRESS="127.0.0.1:0",
                              IMPORTER_METRICS_ADDRESS_FILE=str(metrics))
        assert relay.paused.wait(30), source.finish()
        # Held at the cut: the source's progress is under way.
        with requests.Session() as session:
            session.trust_env = False
            address = metrics.read_text().strip()
            text = session.get(f"http://{address}/metrics", timeout=10).text
        assert 0 < _metric(text, "kubevirt_cdi_clone_progress_total") < 100
        assert _metric(text, "kubevirt_cdi_clone_bytes_sent") > MiB
        assert _metric(text, "kubevirt_cdi_clone_bytes_expected") == MID_DATA
        if how == "target-killed":
            deadline = time.monotonic() + 10
            while not target.vol.disk.exists():  # the killed server leaves a partial image
                assert time.monotonic() < deadline, target.output()
                time.sleep(0.02)
            relay.on_cut = functools.partial(_kill, target.proc)
        relay.go.set()
        if how == "target-killed":
            while target.proc.poll() is None:
                time.sleep(0.02)
            target = start_target(target.vol, port=target.port)
        # Cut: one retry.  Killed: as many as the target's restart takes.
        _cloned(source, allocated=MID_DATA, sent=MID_DATA,
                attempts=range(2, 3) if how == "cut" else range(2, 8))
    finally:
        relay.close()
    target.completed()
    _same(mid, target.vol.disk)
    _sparse(target.vol.disk, MID_DATA)
