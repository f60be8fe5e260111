"""Uploads end to end: `cdi image-upload` and a plain HTTP client through the proxy."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support import tls as tls_support

MiB = 1 << 20


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return images.make_raw(tmp_path / "disk.raw", virtual_size=48 * MiB,
                           extents=[(0, MiB), (30 * MiB, 2 * MiB)])


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qcow2.xz"])
def test_image_upload(server: Server, raw: Path, tmp_path: Path, fmt: str) -> None:
    path = raw
    if fmt.startswith("qcow2"):
        path = images.convert(raw, tmp_path / "disk.qcow2", "qcow2")
    if fmt.endswith(".xz"):
        path = images.compress(path, "xz")
    name = f"up-{fmt.replace('.', '-')}"
    p = server.cli("image-upload", "dv", name, "--image-path", str(path), "--size", "64Mi")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"DataVolume default/{name} Succeeded"
    dv = server.get("dv", name)
    assert phase(dv) == "Succeeded"
    assert (condition(dv, "Running")["reason"], condition(dv, "Running")["message"]) == (
        "Completed", "Upload Complete")
    assert qemu_img.compare(str(raw), str(volume_of(server, name)))


def _proxy(server: Server) -> tuple[str, str]:
    status = server.get("cdiconfig", "config", namespace="")["status"]
    ca = Path(tempfile.mkdtemp()) / "ca.pem"
    ca.write_text(status["uploadProxyCA"])
    return status["uploadProxyURL"], str(ca)


def _token(server: Server, pvc: str) -> str:
    r = server.create({"apiVersion": "upload.cdi.kubevirt.io/v1beta1",
                       "kind": "UploadTokenRequest", "metadata": {"name": pvc},
                       "spec": {"pvcName": pvc}})
    assert r.status_code == 201, r.text
    token: str = r.json()["status"]["token"]
    return token


def test_plain_client_like_virtctl(server: Server, raw: Path) -> None:
    dv: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "plain"},
        "spec": {"source": {"upload": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "plain", lambda o: phase(o) == "UploadReady")
    url, ca = _proxy(server)
    with requests.Session() as s:
        r = s.post(f"{url}/v1beta1/upload", data=raw.read_bytes(), verify=ca, timeout=60)
        assert (r.status_code, r.headers["Access-Control-Allow-Origin"]) == (400, "*")
        r = s.post(f"{url}/v1beta1/upload", data=b"x", verify=ca, timeout=60,
                   headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401
        with raw.open("rb") as f:
            r = s.post(f"{url}/v1beta1/upload", data=f, verify=ca, timeout=120,
                       headers={"Authorization": f"Bearer {_token(server, 'plain')}"})
        assert r.status_code == 200, r.text
    server.wait_for("dv", "plain", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "plain")))


def test_not_an_upload_target(server: Server) -> None:
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
          "metadata": {"name": "blank"},
          "spec": {"source": {"blank": {}},
                   "storage": {"resources": {"requests": {"storage": "8Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "blank", lambda o: phase(o) == "Succeeded")
    url, ca = _proxy(server)
    r = requests.post(f"{url}/v1beta1/upload", data=b"x", verify=ca, timeout=30,
                      headers={"Authorization": f"Bearer {_token(server, 'blank')}"})
    assert r.status_code in (400, 503)
    assert "not an upload target" in r.text


def test_image_upload_resumes_after_the_upload_server_dies(server: Server,
                                                           tmp_path: Path) -> None:
    big = images.make_raw(tmp_path / "big.raw", virtual_size=1536 * MiB,
                          extents=[(0, 32 * MiB), (900 * MiB, 32 * MiB), (1500 * MiB, 16 * MiB)])
    # Every byte (--no-sparse): a sparse stream of 80 MiB of data is over too soon to be
    # interrupted here; tests/importer/test_sparse_upload.py kills a server mid-stream.
    proc = subprocess.Popen(["cdi", "image-upload", "dv", "resumed", "--image-path", str(big),
                             "--size", "2Gi", "--no-sparse"], env=server.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once the upload server holds part of the file durably, kill it (-9).
        deadline = time.monotonic() + 60
        killed = False
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            r = server.session.get(server.path("pvc", "resumed"), timeout=10)
            pod = server.session.get(server.path("pod", "cdi-upload-resumed"), timeout=10)
            if r.status_code != 200 or pod.status_code != 200 or \
                    not r.json()["spec"].get("volumeName"):
                continue
            state = volume_of(server, "resumed").parent / ".upload-state.json"
            pid = pod.json()["metadata"].get("annotations", {}).get(
                "embedded.cdi.kubevirt.io/pid")
            try:
                offset = json.loads(state.read_text()).get("offset", 0)
            except (OSError, ValueError):
                continue
            if pid and offset > 16 * MiB:
                os.killpg(int(pid), signal.SIGKILL)
                killed = True
        assert killed, "the upload finished before the test could interrupt it"
        _out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "continuing at byte" in err
    resumed_at = int(err.split("continuing at byte ")[1].split()[0])
    assert resumed_at > 0, "it continued, it did not start again"
    assert qemu_img.compare(str(big), str(volume_of(server, "resumed")))


def test_upload_servers_speak_mutual_tls_only(server: Server, raw: Path) -> None:
    """On its TCP port (what a cluster uses) each upload server speaks TLS with its own
    certificate and accepts no client but one with the proxy's client certificate."""
    dv: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "mtls"},
        "spec": {"source": {"upload": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "mtls", lambda o: phase(o) == "UploadReady")
    pod = server.get("pod", "cdi-upload-mtls")
    address = pod["metadata"]["annotations"]["embedded.cdi.kubevirt.io/upload-address"]
    host, port = address.rsplit(":", 1)
    signer = server.data_dir / "uploadserver-signer" / "ca.crt"
    # Its certificate is its own, from the upload-server signer.
    ctx = ssl.create_default_context(cafile=str(signer))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # TLS 1.3: the handshake completes, then the missing client certificate is refused.
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            cert = tls.getpeercert()
            assert cert is not None
            assert dict(x[0] for x in cert["subject"])["commonName"] == "cdi-upload-mtls"
            with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_REQUIRED|EOF occurred"):
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(100)
    # Plain HTTP is not spoken at all.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{address}/healthz", timeout=10)
    # A client certificate from another CA is refused too.
    other = tls_support.make_ca()
    client = other.issue_cert("client.upload-server.cdi.kubevirt.io")
    with tempfile.TemporaryDirectory() as d:
        cert_file = Path(d) / "client.pem"
        client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://{address}/healthz", verify=str(signer),
                         cert=str(cert_file), timeout=10)
    # The proxy's client certificate gets through: an upload straight to the port.
    proxy_client = server.data_dir / "uploadserver-client-signer" / "client"
    with raw.open("rb") as f:
        r = requests.post(f"https://{address}/v1beta1/upload", data=f, verify=str(signer),
                          cert=(str(proxy_client / "tls.crt"), str(proxy_client / "tls.key")),
                          timeout=120)
    assert r.status_code == 200, r.text
    server.wait_for("dv", "mtls", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "mtls")))


def test_the_proxy_reaches_upload_servers_over_a_private_unix_socket(server: Server,
                                                                     raw: Path) -> None:
    """In cdi serve the proxy sends to the upload server's Unix socket (no TLS on that hop):
    0600 in a 0700 directory of the data dir, so only the serving user gets in."""
    dv: dict[str, Any] = {
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
        "metadata": {"name": "local"},
        "spec": {"source": {"upload": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
    assert server.create(dv).status_code == 201
    server.wait_for("dv", "local", lambda o: phase(o) == "UploadReady")
    pod = server.get("pod", "cdi-upload-local")
    sock = Path(pod["metadata"]["annotations"]["embedded.cdi.kubevirt.io/upload-socket"])
    assert sock.parent == server.data_dir / "run"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
    assert sock.lstat().st_uid == os.geteuid()
    # Our user speaks plain HTTP there ...
    ok = subprocess.run(["curl", "-sS", "--unix-socket", str(sock), "http://localhost/healthz"],
                        capture_output=True, text=True, timeout=30, check=False)
    assert (ok.returncode, ok.stdout) == (0, "OK"), ok.stderr
    if os.geteuid() == 0:  # ... another user cannot even connect (root can switch to one)
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS",
             "--unix-socket", str(sock), "http://localhost/healthz"],
            capture_output=True, text=True, timeout=30, check=False)
        assert (other.returncode, other.stdout) == (7, ""), other  # could not connect
    url, ca = _proxy(server)
    with raw.open("rb") as f:
        r = requests.post(f"{url}/v1beta1/upload", data=f, verify=ca, timeout=120,
                          headers={"Authorization": f"Bearer {_token(server, 'local')}"})
    assert (r.status_code, r.text) == (200, "")
    server.wait_for("dv", "local", lambda o: phase(o) == "Succeeded")
    assert qemu_img.compare(str(raw), str(volume_of(server, "local")))
    log = server.log()
    assert "upstream=unix:" + str(sock) in log, "the proxy went over the Unix socket"


def test_a_data_dir_too_long_for_a_socket_keeps_mutual_tls(tmp_path: Path, raw: Path) -> None:
    """A socket path must fit in 107 bytes: with a longer data dir cdi serve makes no socket,
    says so, and the proxy reaches the upload server over TCP with mutual TLS."""
    server = Server(tmp_path / ("d" * 100)).start()
    try:
        assert len(str(server.data_dir / "run" / "0123456789abcdef.sock")) > 107
        dv: dict[str, Any] = {
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "far"},
            "spec": {"source": {"upload": {}},
                     "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
        assert server.create(dv).status_code == 201
        server.wait_for("dv", "far", lambda o: phase(o) == "UploadReady")
        annotations = server.get("pod", "cdi-upload-far")["metadata"]["annotations"]
        assert "embedded.cdi.kubevirt.io/upload-socket" not in annotations
        url, ca = _proxy(server)
        with raw.open("rb") as f:
            r = requests.post(f"{url}/v1beta1/upload", data=f, verify=ca, timeout=120,
                              headers={"Authorization": f"Bearer {_token(server, 'far')}"})
        assert (r.status_code, r.text) == (200, "")
        server.wait_for("dv", "far", lambda o: phase(o) == "Succeeded")
        assert qemu_img.compare(str(raw), str(volume_of(server, "far")))
        log = server.log()
        assert "data dir too long for a Unix socket" in log
        assert "upstream=https://127.0.0.1:" in log, "the proxy went over TCP"
    finally:
        server.session.close()
        server.stop()
