"""Uploads through a real `cdi serve`, its proxy and its upload servers, case by case.

Formats and volume modes with `cdi image-upload`, `--no-create`, archives (and a
hostile one), every token failure against the proxy, refusals relayed from the
upload server, HTML escaping of what the proxy echoes, a plain `curl`, and a
2 GiB upload that survives three cut connections through a TCP relay.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images

MiB = 1 << 20
GiB = 1 << 30
ANN = "cdi.kubevirt.io/"
NO_CAPACITY = ("Saving stream failed: effective image size is larger than the reported "
               "available storage: ")
EXPECTED_HEADERS = {"Access-Control-Allow-Origin": "*", "X-Content-Type-Options": "nosniff"}
INVALID_TOKEN_HEADER = 'Bearer error="invalid_token"'


# --- helpers ------------------------------------------------------------------------------------


def ready_upload_dv(server: Server, name: str, size: str = "64Mi") -> dict[str, Any]:
    """Create an upload DataVolume through the REST API and wait until it takes an upload."""
    r = server.create({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                       "metadata": {"name": name, "namespace": "default"},
                       "spec": {"source": {"upload": {}},
                                "storage": {"resources": {"requests": {"storage": size}}}}})
    assert r.status_code == 201, r.text
    return server.wait_for("dv", name, lambda o: phase(o) == "UploadReady")


@dataclass(frozen=True)
class Proxy:
    url: str
    ca: str  # the proxy's CA bundle, from CDIConfig status.uploadProxyCA

    def post(self, token: str | None, data: Any = b"x", path: str = "/v1beta1/upload",
             headers: dict[str, str] | None = None) -> requests.Response:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + path, data=data, headers=h, verify=self.ca, timeout=120)


def proxy_of(server: Server, directory: Path) -> Proxy:
    status = server.wait_for("cdiconfig", "config",
                             lambda o: bool(o.get("status", {}).get("uploadProxyCA")),
                             namespace="")["status"]
    ca = directory / "uploadproxy-ca.pem"
    ca.write_text(status["uploadProxyCA"])
    return Proxy(status["uploadProxyURL"], str(ca))


def upload_token(server: Server, pvc: str) -> str:
    """A token from the API server (UploadTokenRequest), as a client gets one."""
    r = server.create({"apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                       "kind": "UploadTokenRequest", "metadata": {"name": pvc},
                       "spec": {"pvcName": pvc}})
    assert r.status_code == 201, r.text
    token: str = r.json()["status"]["token"]
    return token


def serve_key(server: Server) -> rsa.RSAPrivateKey:
    """The key `cdi serve` signs upload tokens with."""
    return tokens.load_key(server.data_dir / "upload-token.key")


def assert_answer(r: requests.Response, status: int, body: str) -> None:
    """Exactly this status and text/plain body, with CORS and nosniff."""
    assert (r.status_code, r.text) == (status, body)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    for name, value in EXPECTED_HEADERS.items():
        assert r.headers.get(name) == value, (name, dict(r.headers))


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return images.make_raw(tmp_path / "disk.raw", virtual_size=32 * MiB,
                           extents=[(0, MiB), (12 * MiB, 2 * MiB), (31 * MiB, MiB)], seed=7)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `cdi serve` for the tests that only need the proxy's answers."""
    s = Server(tmp_path_factory.mktemp("shared") / "serve").start()
    try:
        yield s
    finally:
        s.session.close()
        s.stop()


# --- 1. formats and volume modes with `cdi image-upload` --------------------------------------


FORMAT_CASES = [
    pytest.param("vmdk", None, id="vmdk-filesystem"),
    pytest.param("iso", None, id="iso-filesystem"),
    pytest.param("raw.gz", None, id="raw.gz-filesystem"),
    pytest.param("raw", "block", id="raw-block"),
    pytest.param("qcow2", "block", id="qcow2-block"),
]


@pytest.mark.parametrize(("fmt", "volume_mode"), FORMAT_CASES)
def test_image_upload_formats_and_volume_modes(server: Server, raw: Path, tmp_path: Path,
                                               fmt: str, volume_mode: str | None) -> None:
    source = raw  # what the volume must hold
    if fmt == "iso":
        source = images.make_iso_like(tmp_path / "disk.iso", 6 * MiB + 4096, seed=3)
        path = source
    elif fmt == "raw.gz":
        path = images.compress(raw, "gz")
    elif fmt == "raw":
        path = raw
    else:
        path = images.convert(raw, tmp_path / f"disk.{fmt}", fmt)
    name = f"fmt-{fmt.replace('.', '-')}-{volume_mode or 'fs'}"
    args = ["image-upload", "dv", name, "--image-path", str(path), "--size", "64Mi"]
    if volume_mode:
        args += ["--volume-mode", volume_mode]
    p = server.cli(*args)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"DataVolume default/{name} Succeeded\n"
    assert f"DataVolume default/{name} created" in p.stderr
    dv = server.get("dv", name)
    assert phase(dv) == "Succeeded"
    running = condition(dv, "Running")
    assert (running["reason"], running["message"]) == ("Completed", "Upload Complete")
    pvc = server.get("pvc", name)
    assert pvc["spec"].get("volumeMode", "Filesystem") == ("Block" if volume_mode else
                                                           "Filesystem")
    disk = volume_of(server, name)
    if volume_mode == "block":
        assert disk.name.endswith(".img") and disk.parent.name == "volumes"
        assert disk.stat().st_size == 64 * MiB
    else:
        assert disk.name == "disk.img"
    assert qemu_img.compare(str(source), str(disk))
    if fmt == "iso":
        # Taken as raw: byte for byte, the ISO 9660 descriptor where it was.
        with disk.open("rb") as f:
            head = f.read(source.stat().st_size)
        assert hashlib.sha256(head).hexdigest() == sha256(source)
        assert head[0x8001:0x8006] == b"CD001"


# --- 2. --no-create ------------------------------------------------------------------------------


def test_no_create_uploads_into_an_existing_datavolume(server: Server, raw: Path) -> None:
    uid = ready_upload_dv(server, "existing")["metadata"]["uid"]
    p = server.cli("image-upload", "dv", "existing", "--no-create", "--image-path", str(raw))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "DataVolume default/existing Succeeded\n"
    assert "created" not in p.stderr
    dv = server.get("dv", "existing")
    assert (dv["metadata"]["uid"], phase(dv)) == (uid, "Succeeded")
    # The DataVolume's own size (64Mi), not the file's (32 MiB).
    assert volume_of(server, "existing").stat().st_size == 64 * MiB
    assert qemu_img.compare(str(raw), str(volume_of(server, "existing")))


def test_no_create_without_the_datavolume(server: Server, raw: Path) -> None:
    p = server.cli("image-upload", "dv", "ghost", "--no-create", "--image-path", str(raw))
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", "error: DataVolume default/ghost does not exist "
               "(--no-create uploads into an existing one)\n")
    for kind in ("dv", "pvc"):
        assert server.session.get(server.path(kind, "ghost"), timeout=10).status_code == 404


# --- 3. archives ---------------------------------------------------------------------------------


def test_archive_upload_extracts_onto_the_volume(server: Server, tmp_path: Path) -> None:
    members = {"hello.txt": b"hello, volume\n",
               "dir/nested/data.bin": random.Random(5).randbytes(3 * MiB + 17),
               "empty": b""}
    tar = images.make_tar(tmp_path / "files.tar", members)
    p = server.cli("image-upload", "dv", "files", "--archive-path", str(tar), "--size", "64Mi")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "DataVolume default/files Succeeded\n"
    assert server.get("dv", "files")["spec"]["contentType"] == "archive"
    pvc = server.get("pvc", "files")
    assert pvc["metadata"]["annotations"][ANN + "storage.contentType"] == "archive"
    directory = volume_of(server, "files").parent
    assert files_under(directory) == members


def test_hostile_archive_is_refused(server: Server, tmp_path: Path) -> None:
    tar = images.hostile_tar(tmp_path, "dotdot", extra={"fine.txt": b"fine\n"})
    p = server.cli("image-upload", "dv", "hostile", "--archive-path", str(tar),
                   "--size", "64Mi", "--retry", "0")
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.splitlines()[-1] == (
        "error: upload failed (400): Saving stream failed: archive member '../evil' refused: "
        "'../evil' would be extracted to "
        f"'{volume_of(server, 'hostile').parent.parent.resolve() / 'evil'}', "
        "which is outside the destination")
    # Nothing written outside the volume, and nothing left inside it.
    directory = volume_of(server, "hostile").parent
    assert not (directory.parent / "evil").exists()
    assert [p for p in server.root.rglob("evil")] == []
    assert files_under(directory) == {}
    assert phase(server.get("dv", "hostile")) == "UploadReady"


# --- 4. tokens against the proxy ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenCase:
    header: Callable[[rsa.RSAPrivateKey], str | None]  # the Authorization header, or None
    status: int
    body: Callable[[], str]


_NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
_HOUR = datetime.timedelta(hours=1)
_LIFETIME = datetime.timedelta(seconds=tokens.DEFAULT_LIFETIME)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _bearer(**kw: Any) -> Callable[[rsa.RSAPrivateKey], str]:
    def header(key: rsa.RSAPrivateKey) -> str:
        args: dict[str, Any] = {"namespace": "default", "name": "target", **kw}
        signer = args.pop("key", key)
        return f"Bearer {tokens.issue(signer, **args)}"
    return header


TOKEN_CASES = {
    "missing": TokenCase(
        lambda key: None, 400,
        lambda: 'missing Authorization header, expected "Authorization: Bearer TOKEN"'),
    "basic-scheme": TokenCase(
        lambda key: "Basic dXNlcjpwYXNz", 400,
        lambda: 'malformed Authorization header, expected "Authorization: Bearer TOKEN"'),
    "bad-charset": TokenCase(
        lambda key: "Bearer abc,def", 400,
        lambda: 'malformed Authorization header, expected "Authorization: Bearer TOKEN"'),
    "garbled": TokenCase(
        lambda key: "Bearer abc.def.ghi", 401,
        lambda: "invalid token: token is malformed: header is not JSON"),
    "two-parts": TokenCase(
        lambda key: "Bearer abc.def", 401,
        lambda: "invalid token: token is malformed: not three dot-separated parts"),
    "another-key": TokenCase(
        _bearer(key=_OTHER_KEY), 401, lambda: "invalid token: token signature is invalid"),
    "expired": TokenCase(
        _bearer(now=_NOW - _HOUR), 401,
        lambda: f"invalid token: token expired at {(_NOW - _HOUR + _LIFETIME).isoformat()}"),
    "not-yet-valid": TokenCase(
        _bearer(now=_NOW + _HOUR), 401,
        lambda: f"invalid token: token is not valid before {(_NOW + _HOUR).isoformat()}"),
    "wrong-issuer": TokenCase(
        _bearer(issuer="cdi-deployment"), 401,
        # The reason is escaped like everything the proxy echoes.
        lambda: "invalid token: token issuer is &#x27;cdi-deployment&#x27;, "
                "not &#x27;cdi-apiserver&#x27;"),
    "clone": TokenCase(
        _bearer(operation=tokens.CLONE,
                params={"targetNamespace": "default", "targetName": "copy"}), 400,
        lambda: "token does not allow this upload: token is for operation &#x27;Clone&#x27;, "
                "not &#x27;Upload&#x27;"),
    "snapshot-resource": TokenCase(
        _bearer(resource=tokens.SNAPSHOT_RESOURCE), 400,
        lambda: "token does not allow this upload: token is for resource "
                "snapshot.storage.k8s.io/v1/volumesnapshots, not v1/persistentvolumeclaims"),
    "not-an-upload-target": TokenCase(
        _bearer(name="plain"), 503, lambda: "PVC plain is not an upload target"),
    "no-such-pvc": TokenCase(
        _bearer(name="nowhere"), 503,
        lambda: "rejecting Upload Request for PVC nowhere that doesn&#x27;t exist"),
}


@pytest.fixture(scope="module")
def token_target(shared: Server) -> Server:
    """The shared server with an upload DataVolume `target` and a plain claim `plain`."""
    ready_upload_dv(shared, "target")
    r = shared.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": {"name": "plain"},
                       "spec": {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": "8Mi"}}}})
    assert r.status_code == 201, r.text
    return shared


@pytest.mark.parametrize("case", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_token_refused(token_target: Server, tmp_path: Path, case: TokenCase) -> None:
    proxy = proxy_of(token_target, tmp_path)
    header = case.header(serve_key(token_target))
    r = requests.post(proxy.url + "/v1beta1/upload", data=b"\0" * 4096, verify=proxy.ca,
                      timeout=30, headers={} if header is None else {"Authorization": header})
    assert_answer(r, case.status, case.body())
    assert r.headers.get("WWW-Authenticate") == (
        INVALID_TOKEN_HEADER if case.status == 401 else None)
    # The upload server saw nothing: the DataVolume still waits for its upload.
    assert phase(token_target.get("dv", "target")) == "UploadReady"


def test_valid_token_then_upload_already_complete(server: Server, raw: Path,
                                                  tmp_path: Path) -> None:
    ready_upload_dv(server, "once")
    proxy = proxy_of(server, tmp_path)
    token = upload_token(server, "once")
    with raw.open("rb") as f:
        r = proxy.post(token, f)
    assert_answer(r, 200, "")
    server.wait_for("dv", "once", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "once")))
    before = sha256(volume_of(server, "once"))
    # Once it finished, the proxy refuses at once (the same token, or a fresh one).
    for t in (token, upload_token(server, "once")):
        started = time.monotonic()
        r = proxy.post(t, b"\xff" * MiB)
        assert_answer(r, 503, "PVC once already finished uploading")
        assert time.monotonic() - started < 5
    r = requests.head(proxy.url + "/v1beta1/upload-async", verify=proxy.ca, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
    assert_answer(r, 503, "")  # a HEAD answer has no body
    assert r.headers["Content-Length"] == str(len("PVC once already finished uploading"))
    assert sha256(volume_of(server, "once")) == before


# --- 5. refusals relayed from the upload server --------------------------------------------------


def test_second_upload_while_one_is_in_progress(server: Server, raw: Path,
                                                tmp_path: Path) -> None:
    ready_upload_dv(server, "busy")
    proxy = proxy_of(server, tmp_path)
    data = raw.read_bytes()
    release = threading.Event()
    first: list[requests.Response] = []

    def slow_body() -> Iterator[bytes]:
        yield data[:MiB]
        if not release.wait(60):
            raise RuntimeError("never released")
        for start in range(MiB, len(data), MiB):
            yield data[start:start + MiB]

    def first_upload() -> None:
        first.append(proxy.post(upload_token(server, "busy"), slow_body()))

    t = threading.Thread(target=first_upload)
    t.start()
    try:
        token = upload_token(server, "busy")
        deadline = time.monotonic() + 30
        while True:  # until the upload server has taken the first upload
            r = requests.get(proxy.url + "/v1beta1/upload-offset", verify=proxy.ca, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            if r.json()["inProgress"]:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        for path in ("/v1beta1/upload", "/v1beta1/upload-async", "/v1alpha1/upload"):
            r = proxy.post(token, b"\x01" * (256 * 1024), path=path)
            assert_answer(r, 503, "Upload already in progress")
    finally:
        release.set()
        t.join(timeout=90)
    assert not t.is_alive()
    assert_answer(first[0], 200, "")
    server.wait_for("dv", "busy", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "busy")))


def test_image_larger_than_the_datavolume(server: Server, raw: Path, tmp_path: Path) -> None:
    ready_upload_dv(server, "small", "16Mi")
    too_large = (NO_CAPACITY + "virtual image size 33554432 is larger than the reported "
                 "available storage 16777216. A larger PVC is required")
    proxy = proxy_of(server, tmp_path)
    with raw.open("rb") as f:
        r = proxy.post(upload_token(server, "small"), f)
    assert_answer(r, 400, too_large)
    time.sleep(1)
    dv = server.get("dv", "small")
    assert phase(dv) == "UploadReady"
    assert not volume_of(server, "small").exists()
    # The same goes for an image whose virtual size is too big (qcow2, converted).
    qcow2 = images.convert(raw, tmp_path / "disk.qcow2", "qcow2")
    with qcow2.open("rb") as f:
        r = proxy.post(upload_token(server, "small"), f)
    assert_answer(r, 400, too_large)
    assert phase(server.get("dv", "small")) == "UploadReady"
    # The upload server takes a new upload that fits.
    fits = images.make_raw(tmp_path / "fits.raw", virtual_size=8 * MiB,
                           extents=[(MiB, MiB)], seed=9)
    with fits.open("rb") as f:
        assert_answer(proxy.post(upload_token(server, "small"), f), 200, "")
    server.wait_for("dv", "small", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(fits), str(volume_of(server, "small")))


# --- 6. what the proxy echoes is escaped ---------------------------------------------------------


SCRIPT = "<script>alert('x')</script>"
ESCAPED = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"


def test_pvc_name_from_the_token_is_escaped(shared: Server, tmp_path: Path) -> None:
    proxy = proxy_of(shared, tmp_path)
    token = tokens.issue(serve_key(shared), namespace="default", name=SCRIPT)
    r = proxy.post(token, b"x")
    assert_answer(r, 503, f"rejecting Upload Request for PVC {ESCAPED} that doesn&#x27;t exist")
    assert "<script>" not in r.text


def test_content_type_from_the_claim_is_escaped(shared: Server, tmp_path: Path) -> None:
    ready_upload_dv(shared, "xss")
    r = shared.session.patch(
        shared.path("pvc", "xss"), timeout=10,
        json={"metadata": {"annotations": {ANN + "storage.contentType": SCRIPT}}},
        headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    proxy = proxy_of(shared, tmp_path)
    r = proxy.post(upload_token(shared, "xss"), b"x")
    assert_answer(r, 503, "rejecting upload request for PVC default/xss: "
                          f"upload content-type {ESCAPED} is invalid")
    assert "<script>" not in r.text
    assert phase(shared.get("dv", "xss")) == "UploadReady"


# --- 7. curl ------------------------------------------------------------------------------------


def test_curl_upload_async(server: Server, raw: Path, tmp_path: Path) -> None:
    ready_upload_dv(server, "curled")
    proxy = proxy_of(server, tmp_path)
    auth = f"Authorization: Bearer {upload_token(server, 'curled')}"
    url = f"{proxy.url}/v1beta1/upload-async"
    head = subprocess.run(["curl", "-sS", "-I", "-o", "/dev/null", "-w", "%{http_code}",
                           "-H", auth, "--cacert", proxy.ca, url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (head.returncode, head.stdout, head.stderr) == (0, "200", "")
    post = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "body"), "-w", "%{http_code}",
                           "--data-binary", f"@{raw}", "-H", auth, "--cacert", proxy.ca, url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert (post.returncode, post.stdout, post.stderr) == (0, "200", "")
    assert (tmp_path / "body").read_bytes() == b""
    server.wait_for("dv", "curled", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "curled")))


# --- 8. resume at scale through a relay that cuts the connection ---------------------------------


def _reset(sock: socket.socket) -> None:
    """Drop a connection the hard way (RST), waking any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class UploadCutter:
    """A TCP relay 127.0.0.1:<port> -> 127.0.0.1:<backend_port> that resets the connection
    carrying client->server byte number ``cut_at[i]`` (counted over all connections),
    once per cut point. (tests/support/cutter.py cuts responses, not requests.)"""

    def __init__(self, backend_port: int, cut_at: list[int]) -> None:
        self._backend_port = backend_port
        self._pending = sorted(cut_at)
        self.cuts: list[int] = []  # client->server bytes relayed when each cut happened
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> UploadCutter:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            live = list(self._sockets)
        for s in live:
            _reset(s)
        for t in self._threads:
            t.join(timeout=10)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self._backend_port), timeout=10)
            except OSError:
                _reset(client)
                continue
            backend.settimeout(None)
            with self._lock:
                self._sockets.update((client, backend))
            self._spawn(self._upstream, client, backend)
            self._spawn(self._downstream, backend, client)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(socks)
        for s in socks:
            _reset(s)

    def _upstream(self, client: socket.socket, backend: socket.socket) -> None:
        try:
            while data := client.recv(256 * 1024):
                with self._lock:
                    cut = bool(self._pending) and self.sent + len(data) >= self._pending[0]
                    if cut:
                        data = data[:self._pending.pop(0) - self.sent]
                    self.sent += len(data)
                    if cut:
                        self.cuts.append(self.sent)
                backend.sendall(data)
                if cut:
                    self._drop(client, backend)
                    return
            backend.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client, backend)

    def _downstream(self, backend: socket.socket, client: socket.socket) -> None:
        try:
            while data := backend.recv(256 * 1024):
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client, backend)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", ["plain", "sparse"])
def test_resume_a_2gib_upload_cut_three_times(server: Server, tmp_path: Path,
                                              stream: str) -> None:
    """Every byte (--no-sparse, as virtctl sends) or the data only (a sparse stream, the
    default for a raw image): cut at 30, 60 and 95 % of what is sent, the upload goes on
    where the server's durable offset is, and the volume equals the file."""
    size = 2 * GiB
    # ~200 MiB of data in ten extents spread over the 2 GiB.
    extents = [(i * 200 * MiB + 3 * MiB, 20 * MiB) for i in range(10)]
    big = images.make_raw(tmp_path / "big.raw", virtual_size=size, extents=extents, seed=11)
    proxy = proxy_of(server, tmp_path)
    proxy_port = int(proxy.url.rsplit(":", 1)[1])
    sent = size if stream == "plain" else 200 * MiB
    points = [int(sent * f) for f in (0.30, 0.60, 0.95)]
    flag = "--no-sparse" if stream == "plain" else "--sparse"
    started = time.monotonic()
    with UploadCutter(proxy_port, points) as relay:
        p = server.cli("image-upload", "dv", "cut", "--image-path", str(big), "--size", "2Gi",
                       "--uploadproxy-url", f"https://127.0.0.1:{relay.port}", flag)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == "DataVolume default/cut Succeeded\n"
    assert relay.cuts == points, "every cut happened, once"
    assert relay.sent >= sent
    if stream == "sparse":
        assert "its data only (sparse stream)" in p.stderr
        assert relay.sent < 2 * sent, "the holes were not sent"
    else:
        assert "sparse stream" not in p.stderr
    resumed = [int(line.split("continuing at byte ")[1].split()[0])
               for line in p.stderr.splitlines() if "continuing at byte " in line]
    assert len(resumed) == 3, p.stderr[-3000:]
    assert all(n > 0 for n in resumed), resumed
    assert resumed == sorted(resumed) and len(set(resumed)) == 3, resumed
    if stream == "plain":
        # Each continuation starts at or before the point where its connection was cut.
        assert all(n <= cut for n, cut in zip(resumed, points, strict=True)), (resumed, points)
    assert qemu_img.compare(str(big), str(volume_of(server, "cut")))
    assert elapsed < 150, f"the upload took {elapsed:.0f} s"
