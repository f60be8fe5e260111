"""The upload server as a pod runs it: a real subprocess on 127.0.0.1, real requests.

Every test starts ``python -m importer.uploadserver`` on port 0 (the bound
address comes back through UPLOAD_ADDRESS_FILE), uploads with ``requests``
from files (streamed, never read whole), and checks the volume with qemu-img,
the exit code and the termination message.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from importer import qemu_img
from tests.importer.conftest import Volume
from tests.support import images
from tests.support.tls import TLSFiles, write_tls_files

MiB = 1 << 20
OFFSET = "/v1beta1/upload-offset"
COMPLETE = {"message": "Upload Complete", "scratchSpaceRequired": False,
            "preallocationApplied": False}
NO_CAPACITY = ("Saving stream failed: effective image size is larger than the reported "
               "available storage")
CLIENT_NAME = "client.upload-server.cdi.kubevirt.io"
# 64 MiB, 36 MiB of data with holes between: cutting at 40% lands inside data.
RESUME_EXTENTS = [(0, 8 * MiB), (20 * MiB, 12 * MiB), (40 * MiB, 8 * MiB), (56 * MiB, 8 * MiB)]


# --- images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upload-images")
    raw = images.standard_raw(root)  # 64 MiB, 7 MiB of data
    qcow2 = images.convert(raw, root / "disk.qcow2", "qcow2")
    overlay, _ = images.qcow2_with_backing(root / "backing")
    # Compressible, then damaged near its end: qemu-img info accepts it, convert fails.
    pattern = root / "pattern.raw"
    pattern.write_bytes(b"0123456789abcdef" * (MiB // 2))
    corrupt = images.convert(pattern, root / "corrupt.qcow2", "qcow2", compressed=True)
    with corrupt.open("r+b") as f:
        f.seek(corrupt.stat().st_size - 8192)
        f.write(b"\xff" * 4096)
    archive_dir = root / "archive"
    archive_dir.mkdir()
    tar = images.make_tar(archive_dir / "content.tar",
                          {"disk.img": b"disk" * 1000, "sub/readme.txt": b"hello\n"})
    return {
        "raw": raw,
        "raw.gz": images.compress(raw, "gz"),
        "qcow2": qcow2,
        "qcow2.xz": images.compress(qcow2, "xz"),
        "vmdk": images.convert(raw, root / "disk.vmdk", "vmdk"),
        "iso": images.make_iso_like(root / "disk.iso", 4 * MiB),
        "small": images.make_raw(root / "small.raw", virtual_size=2 * MiB,
                                 extents=[(0, MiB)], seed=3),
        "big": images.make_raw(root / "big.raw", virtual_size=8 * MiB, extents=[(0, 8 * MiB)]),
        "resume": images.make_raw(root / "resume.raw", virtual_size=64 * MiB,
                                  extents=RESUME_EXTENTS, seed=7),
        "overlay": overlay,
        "corrupt": corrupt,
        "tar": tar,
        "tar.gz": images.compress(tar, "gz"),
    }


def _source_raw(img: dict[str, Path], name: str) -> Path:
    return img["iso"] if name == "iso" else img["raw"]


# --- the server ---------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    vol: Volume
    log: Path
    address: str = ""
    verify: str | bool = True
    cert: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.verify is not True else "http"
        return f"{scheme}://{self.address}"

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def termination(self) -> str:
        path = self.vol.termination_log
        return path.read_text() if path.exists() else ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, path: str, data: Any = b"", **kw: Any) -> tuple[int, str]:
        timeout = kw.pop("timeout", 60)
        with requests.post(self.url + path, data=data, verify=self.verify, cert=self.cert,
                           timeout=timeout, **kw) as r:
            return r.status_code, r.text

    def upload(self, path: str, file: Path, **kw: Any) -> tuple[int, str]:
        with file.open("rb") as f:
            return self.post(path, f, **kw)

    def get(self, path: str) -> requests.Response:
        with requests.get(self.url + path, verify=self.verify, cert=self.cert, timeout=10) as r:
            r.content  # noqa: B018 - read it before the connection closes
            return r

    def offset(self) -> dict[str, Any]:
        data: dict[str, Any] = self.get(OFFSET).json()
        return data

    def settled_offset(self) -> int:
        """The durable offset once the server noticed the client is gone."""
        deadline = time.monotonic() + 10
        while (state := self.offset())["inProgress"]:
            assert time.monotonic() < deadline, "the server never noticed the cut"
            time.sleep(0.05)
        return int(state["offset"])


Start = Callable[..., Server]


@pytest.fixture
def start(volume: Callable[..., Volume]) -> Iterator[Start]:
    """Start an upload server on a volume (a new filesystem volume by default)."""
    procs: list[subprocess.Popen[bytes]] = []

    def go(vol: Volume | None = None, *, wait: bool = True, tls: TLSFiles | None = None,
           **env: str) -> Server:
        vol = vol or volume()
        full = dict(os.environ)
        full.update(vol.env())
        full.update({"LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "0",
                     "UPLOAD_ADDRESS_FILE": str(vol.root / "address"),
                     "UPLOAD_IMAGE_SIZE": "128Mi"})
        if tls is not None:
            full.update({"TLS_CERT_FILE": str(tls.server_cert),
                         "TLS_KEY_FILE": str(tls.server_key)})
        full.update(env)
        (vol.root / "address").unlink(missing_ok=True)
        log = vol.root / f"server-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "importer.uploadserver"], env=full,
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        server = Server(proc, vol, log, verify=str(tls.ca_cert) if tls else True)
        if not wait:
            return server
        deadline = time.monotonic() + 15
        while not (vol.root / "address").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the upload server did not start:\n{server.output()}")
            time.sleep(0.02)
        server.address = (vol.root / "address").read_text().strip()
        return server

    yield go
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


class Body:
    """A request body from pieces (bytes and files) with a length, read as requests sends it.

    ``cut_at`` raises after that many bytes (the client drops the connection);
    ``pause_at`` waits for ``go`` there; ``pace`` sleeps per 1 MiB.
    """

    class Cut(Exception):
        pass

    def __init__(self, *pieces: bytes | Path, cut_at: int | None = None,
                 pause_at: int | None = None, pace: float = 0.0, start: int = 0) -> None:
        self._pieces = list(pieces)
        self._size = sum(p.stat().st_size if isinstance(p, Path) else len(p)
                         for p in pieces) - start
        self._skip = start
        self._sent = 0
        self._cut_at = cut_at
        self._pause_at = pause_at
        self._pace = pace
        self.go = threading.Event()
        self.paused = threading.Event()
        self._file: Any = None

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        n = min(n if n > 0 else MiB, MiB)
        for limit, action in ((self._cut_at, "cut"), (self._pause_at, "pause")):
            if limit is not None and self._sent >= limit:
                if action == "cut":
                    self.close()
                    raise Body.Cut()
                self.paused.set()
                self.go.wait(30)
                self._pause_at = None
            elif limit is not None:
                n = min(n, limit - self._sent)
        if self._pace:
            time.sleep(self._pace * n / MiB)
        while self._pieces:
            piece = self._pieces[0]
            if isinstance(piece, bytes):
                data, self._pieces[0] = piece[:n], piece[n:]
            else:
                if self._file is None:
                    self._file = piece.open("rb")
                    self._file.seek(self._skip)
                data = self._file.read(n)
            if data:
                self._sent += len(data)
                return bytes(data)
            self._pieces.pop(0)
            self.close()
        return b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run FN in a thread; its result or exception lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _completed(server: Server) -> None:
    assert server.wait() == 0, server.output()
    assert json.loads(server.termination) == COMPLETE


def _same(raw: Path, disk: Path) -> None:
    assert qemu_img.compare(str(raw), str(disk)), f"{disk} differs from {raw}"


def _sparse(source: Path, disk: Path) -> None:
    data = images.allocated_bytes(source)
    assert images.allocated_bytes(disk) <= data * 1.1 + MiB, "runs of zeros were written"


# --- formats and targets ------------------------------------------------------------


@pytest.mark.parametrize("name", ["raw", "raw.gz", "qcow2", "qcow2.xz", "vmdk", "iso"])
def test_format_into_filesystem(img: dict[str, Path], start: Start, name: str) -> None:
    server = start()
    assert server.upload("/v1beta1/upload", img[name]) == (200, "")
    _completed(server)
    raw, disk = _source_raw(img, name), server.vol.disk
    _same(raw, disk)
    assert disk.stat().st_size == 128 * MiB  # resized to the volume
    _sparse(raw, disk)
    assert list(server.vol.scratch_dir.iterdir()) == []
    assert sorted(p.name for p in server.vol.data_dir.iterdir()) == ["disk.img"]


@pytest.mark.parametrize("name", ["raw", "qcow2.xz"])
def test_format_into_block(img: dict[str, Path], start: Start,
                           volume: Callable[..., Volume], name: str) -> None:
    vol = volume(block=True, block_size=64 * MiB)
    server = start(vol)
    assert server.upload("/v1beta1/upload", img[name]) == (200, "")
    _completed(server)
    _same(img["raw"], vol.disk)
    assert vol.disk.stat().st_size == 64 * MiB  # a block volume keeps its size
    _sparse(img["raw"], vol.disk)


# --- endpoints ----------------------------------------------------------------------


def _form(file: Path, **kw: Any) -> tuple[Body, dict[str, str]]:
    b = "cdi-test-boundary-1234"
    head = (f"--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nnot the image\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"disk\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{b}--\r\n".encode()
    return Body(head, file, tail, **kw), {"Content-Type": f"multipart/form-data; boundary={b}"}


@pytest.mark.parametrize("path", ["/v1alpha1/upload", "/v1beta1/upload-async",
                                  "/v1alpha1/upload-async", "/v1beta1/upload-form",
                                  "/v1alpha1/upload-form", "/v1beta1/upload-form-async",
                                  "/v1alpha1/upload-form-async"])
def test_endpoint(img: dict[str, Path], start: Start, path: str) -> None:
    server = start()
    if "form" in path:
        body, headers = _form(img["qcow2"])
        assert server.post(path, body, headers=headers) == (200, "")
    else:
        assert server.upload(path, img["qcow2"]) == (200, "")
    _completed(server)
    _same(img["raw"], server.vol.disk)


def test_chunked_body(img: dict[str, Path], start: Start) -> None:
    def chunks() -> Iterator[bytes]:
        with img["raw.gz"].open("rb") as f:
            while chunk := f.read(MiB):
                yield chunk

    server = start()
    assert server.post("/v1beta1/upload", chunks()) == (200, "")  # Transfer-Encoding: chunked
    _completed(server)
    _same(img["raw"], server.vol.disk)


def test_async_failure_after_reply(img: dict[str, Path], start: Start) -> None:
    server = start()
    assert server.upload("/v1beta1/upload-async", img["corrupt"]) == (200, "")
    assert server.wait() == 1
    assert server.termination.startswith("Unable to process data: qemu-img convert failed")
    assert not server.vol.disk.exists()
    assert list(server.vol.scratch_dir.iterdir()) == []


@pytest.mark.parametrize(("path", "name"), [("/v1beta1/upload-archive", "tar"),
                                            ("/v1beta1/upload-archive-async", "tar.gz"),
                                            ("/v1alpha1/upload-archive", "tar.gz")])
def test_archive(img: dict[str, Path], start: Start, path: str, name: str) -> None:
    server = start()
    assert server.upload(path, img[name]) == (200, "")
    _completed(server)
    data = server.vol.data_dir
    assert (data / "disk.img").read_bytes() == b"disk" * 1000
    assert (data / "sub" / "readme.txt").read_bytes() == b"hello\n"


def test_hostile_archive_leaves_nothing(img: dict[str, Path], start: Start,
                                        tmp_path: Path) -> None:
    server = start()
    tar = images.hostile_tar(tmp_path, "dotdot", extra={"disk.img": b"x" * 100})
    status, text = server.upload("/v1beta1/upload-archive", tar)
    assert status == 400
    assert "Saving stream failed: archive member '../evil' refused" in text
    assert list(server.vol.data_dir.iterdir()) == []
    assert not (tmp_path.parent / "evil").exists()
    # Still up for another attempt.
    assert server.upload("/v1beta1/upload-archive", img["tar"]) == (200, "")
    _completed(server)


def test_probes_and_framing(start: Start) -> None:
    server = start()
    with requests.head(server.url + "/v1beta1/upload-async", timeout=10) as r:
        assert r.status_code == 200
    with requests.head(server.url + "/v1alpha1/upload-form-async", timeout=10) as r:
        assert r.status_code == 200
    with requests.Session() as session:  # one connection, several requests
        for path in ("/healthz", OFFSET, "/healthz"):
            with session.get(server.url + path, timeout=10) as r:
                assert r.status_code == 200
    assert server.get("/healthz").text == "OK"
    assert server.get("/nowhere").status_code == 404
    assert server.get("/v1beta1/upload").status_code == 405
    assert server.offset() == {"offset": 0, "complete": False, "inProgress": False}
    assert "kubevirt_cdi_import_bytes_read" in server.get("/metrics").text
    conn = http.client.HTTPConnection(server.address, timeout=10)
    try:  # neither Content-Length nor chunked
        conn.putrequest("POST", "/v1beta1/upload")
        conn.endheaders()
        r = conn.getresponse()
        assert (r.status, r.read()) == (411, b"Content-Length or chunked Transfer-Encoding "
                                             b"required")
    finally:
        conn.close()
    assert server.post("/v1beta1/upload", b"x", headers={"X-Checksum": "crc:12"})[0] == 400
    assert server.proc.poll() is None


# --- one upload at a time -----------------------------------------------------------


def test_busy_then_complete(img: dict[str, Path], start: Start) -> None:
    server = start(UPLOAD_LINGER_SECONDS="3", OWNER_UID="uid-1")
    body = Body(img["small"], pause_at=MiB)
    first, out = _in_thread(lambda: server.post("/v1beta1/upload", body))
    assert body.paused.wait(10)
    assert server.offset()["inProgress"] is True
    assert server.upload("/v1beta1/upload", img["small"]) == (503, "Upload already in progress")
    metrics = _metrics(server.get("/metrics").text)
    assert metrics['kubevirt_cdi_import_bytes_expected{ownerUID="uid-1"}'] == 2 * MiB
    assert 0 < metrics['kubevirt_cdi_import_bytes_read{ownerUID="uid-1"}'] <= MiB  # not the 503's
    body.go.set()
    first.join(30)
    assert out == [(200, "")]
    assert server.offset() == {"offset": 2 * MiB, "complete": True, "inProgress": False}
    assert server.upload("/v1beta1/upload", img["small"]) == (409, "Upload already complete")
    _completed(server)
    _same(img["small"], server.vol.disk)


def _metrics(text: str) -> dict[str, float]:
    return {name: float(value) for line in text.splitlines() if not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]}


# --- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("big", "4Mi"), ("qcow2", "32Mi")])
def test_too_large(img: dict[str, Path], start: Start, name: str, size: str) -> None:
    server = start(UPLOAD_IMAGE_SIZE=size)
    status, text = server.upload("/v1beta1/upload", img[name])
    assert status == 400
    assert text.startswith(NO_CAPACITY + ": ")
    assert not server.vol.disk.exists()
    assert list(server.vol.scratch_dir.iterdir()) == []
    # Not 409: the server takes another upload.
    assert server.upload("/v1beta1/upload", img["small"]) == (200, "")
    _completed(server)


def test_backing_file_refused(img: dict[str, Path], start: Start) -> None:
    server = start()
    status, text = server.upload("/v1beta1/upload", img["overlay"])
    assert status == 400
    assert "invalid backing file base.qcow2" in text
    assert not server.vol.disk.exists()
    assert list(server.vol.scratch_dir.iterdir()) == []
    assert server.proc.poll() is None


def test_scratch_required(img: dict[str, Path], start: Start,
                          volume: Callable[..., Volume]) -> None:
    server = start(volume(scratch=False))
    status, text = server.upload("/v1beta1/upload", img["qcow2"])
    assert (status, text) == (500, "Saving stream failed: scratch space required and none found")
    assert not server.vol.disk.exists()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_checksum_verified(img: dict[str, Path], start: Start) -> None:
    server = start()
    header = {"X-Checksum": f"SHA256:{_sha256(img['raw.gz']).upper()}"}
    assert server.upload("/v1beta1/upload", img["raw.gz"], headers=header) == (200, "")
    _completed(server)
    _same(img["raw"], server.vol.disk)


def test_checksum_mismatch(img: dict[str, Path], start: Start) -> None:
    server = start()
    wrong = "0" * 64
    status, text = server.upload("/v1beta1/upload", img["raw"],
                                 headers={"X-Checksum": f"sha256:{wrong}"})
    assert status == 400
    assert (f"checksum mismatch: expected sha256:{wrong}, calculated "
            f"sha256:{_sha256(img['raw'])}") in text
    assert not server.vol.disk.exists()
    assert server.proc.poll() is None


# --- resume -------------------------------------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["fs", "block"])
def test_resume_after_cut(img: dict[str, Path], start: Start, volume: Callable[..., Volume],
                          block: bool) -> None:
    raw = img["resume"]
    vol = volume(block=block, block_size=64 * MiB)
    server = start(vol)
    cut = int(raw.stat().st_size * 0.4)
    with pytest.raises(Body.Cut):
        server.post("/v1beta1/upload", Body(raw, cut_at=cut))
    offset = server.settled_offset()
    assert 0 < offset <= cut
    state = (vol.scratch_dir if block else vol.data_dir) / ".upload-state.json"
    assert json.loads(state.read_text())["offset"] == offset
    # A wrong offset is refused with the right one.
    status, text = server.post(f"/v1beta1/upload?offset={offset + 1}", b"x")
    assert status == 409
    assert json.loads(text)["offset"] == offset
    checksum = {"X-Checksum": f"sha256:{_sha256(raw)}"}  # over the whole image
    with raw.open("rb") as f:
        f.seek(offset)
        assert server.post(f"/v1beta1/upload?offset={offset}", f, headers=checksum) == (200, "")
    _completed(server)
    _same(raw, vol.disk)
    _sparse(raw, vol.disk)
    assert not state.exists()


def test_resume_after_kill(img: dict[str, Path], start: Start,
                           volume: Callable[..., Volume]) -> None:
    raw = img["resume"]
    vol = volume()
    server = start(vol)
    # Slow enough that a checkpoint (about once a second) lands before the pause.
    body = Body(raw, pause_at=40 * MiB, pace=0.05)
    sender, out = _in_thread(lambda: server.post("/v1beta1/upload", body))
    deadline = time.monotonic() + 20
    while server.offset()["offset"] == 0:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    server.proc.send_signal(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL
    body.go.set()
    sender.join(30)
    body.close()
    assert len(out) == 1 and isinstance(out[0], requests.ConnectionError | Body.Cut)
    again = start(vol)
    offset = again.offset()["offset"]
    assert 0 < offset <= 40 * MiB
    with raw.open("rb") as f:
        f.seek(offset)
        assert again.post(f"/v1beta1/upload-async?offset={offset}", f) == (200, "")
    _completed(again)
    _same(raw, vol.disk)


# --- settings, TLS, deadline --------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "text"), [
    ("LISTEN_ADDRESS", "0.0.0.0", "Invalid settings: TLS_CERT_FILE: refusing to listen on "
                                  "0.0.0.0 without TLS"),
    ("LISTEN_PORT", "https", "Invalid settings: LISTEN_PORT: "),
    ("UPLOAD_IMAGE_SIZE", "lots", "Invalid settings: UPLOAD_IMAGE_SIZE: "),
    ("DEADLINE", "tomorrow", "Invalid settings: DEADLINE: "),
])
def test_bad_settings(start: Start, variable: str, value: str, text: str) -> None:
    server = start(wait=False, **{variable: value})
    assert server.wait() == 1
    assert server.termination.startswith(text)
    assert text in server.output()


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSFiles, Path, Path]:
    """Server files, and two client certificates (ours and a stranger's) from one CA."""
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("mtls")
    files = write_tls_files(root, ca)
    clients = []
    for name in (CLIENT_NAME, "someone-else"):
        pem = root / f"{name}.pem"
        ca.issue_cert(name, common_name=name).private_key_and_cert_chain_pem.write_to_path(
            str(pem))
        clients.append(pem)
    return files, clients[0], clients[1]


def test_mutual_tls(img: dict[str, Path], start: Start,
                    mtls: tuple[TLSFiles, Path, Path]) -> None:
    files, client, stranger = mtls
    server = start(tls=files, CLIENT_CERT_FILE=str(files.ca_cert), CLIENT_NAME=CLIENT_NAME)
    assert server.url.startswith("https://")
    with pytest.raises(requests.ConnectionError):  # no client certificate: no TLS session
        server.get("/healthz")
    server.cert = (str(stranger), str(stranger))
    assert server.upload("/v1beta1/upload", img["small"])[0] == 401
    server.cert = (str(client), str(client))
    assert server.upload("/v1beta1/upload", img["small"]) == (200, "")
    _completed(server)
    _same(img["small"], server.vol.disk)


def test_tls_without_client_certificates(img: dict[str, Path], start: Start,
                                         tls_files: TLSFiles) -> None:
    server = start(tls=tls_files)
    assert server.upload("/v1beta1/upload", img["small"]) == (200, "")
    _completed(server)


def test_deadline_passed(start: Start) -> None:
    deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    server = start(DEADLINE=deadline.isoformat())
    assert server.wait() == 1
    assert json.loads(server.termination) == {"message": "Deadline Passed",
                                              "deadlinePassed": True}
    assert "passed without a completed upload" in server.output()
