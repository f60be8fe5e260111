"""S3 DataVolumes end to end: objects in moto's S3 server imported through `cdi serve`."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from importer import qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support.s3server import MotoS3

MiB = 1 << 20


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    server = MotoS3().start()
    try:
        yield server
    finally:
        # moto's state lives in this process: leave it as the next test expects it.
        server.require_auth(False)
        server.reset()
        server.stop()


def _dv(name: str, url: str, **s3: Any) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name},
            "spec": {"source": {"s3": {"url": url, **s3}},
                     "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}


def _secret(server: Server, name: str, key_id: str, secret: str) -> None:
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
           "data": {"accessKeyId": base64.b64encode(key_id.encode()).decode(),
                    "secretKey": base64.b64encode(secret.encode()).decode()}}
    assert server.create(obj).status_code == 201


def test_s3_imports_with_credentials(server: Server, s3: MotoS3, tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "disk.raw", virtual_size=48 * MiB,
                          extents=[(0, MiB), (30 * MiB, 2 * MiB)])
    qcow2 = images.convert(raw, tmp_path / "disk.qcow2", "qcow2")
    xz = images.compress(raw, "xz")
    for key, path in (("disk.raw", raw), ("disk.qcow2", qcow2), ("disk.raw.xz", xz)):
        s3.put("images", key, path)
    key_id, secret = s3.create_user("importer")
    s3.require_auth(True)
    _secret(server, "s3-creds", key_id, secret)
    for name, key in (("raw", "disk.raw"), ("qcow", "disk.qcow2"), ("xz", "disk.raw.xz")):
        assert server.create(_dv(name, s3.url("images", key),
                                 secretRef="s3-creds")).status_code == 201
    for name in ("raw", "qcow", "xz"):
        dv = server.wait_for("dv", name, lambda o: phase(o) in ("Succeeded", "Failed"),
                             timeout=90)
        assert phase(dv) == "Succeeded", (name, dv["status"])
        assert qemu_img.compare(str(raw), str(volume_of(server, name)))
        assert images.allocated_bytes(volume_of(server, name)) < 8 * MiB, "stays sparse"
    pvc = server.get("pvc", "raw")
    assert pvc["metadata"]["annotations"]["cdi.kubevirt.io/storage.import.source"] == "s3"


def test_s3_wrong_key_and_missing_object(server: Server, s3: MotoS3, tmp_path: Path) -> None:
    raw = images.make_raw(tmp_path / "disk.raw", virtual_size=8 * MiB, extents=[(0, MiB)])
    s3.put("images", "disk.raw", raw)
    key_id, _secret_key = s3.create_user("someone")
    reader = s3.create_user("reader")
    s3.require_auth(True)
    _secret(server, "wrong", key_id, "not-the-secret")
    assert server.create(_dv("denied", s3.url("images", "disk.raw"),
                             secretRef="wrong")).status_code == 201
    _secret(server, "right", *reader)
    assert server.create(_dv("missing", s3.url("images", "nothere.raw"),
                             secretRef="right")).status_code == 201
    for name, words in (("denied", "SignatureDoesNotMatch"), ("missing", "nothere.raw")):
        dv = server.wait_for("dv", name,
                             lambda o: condition(o, "Running").get("reason") == "Error",
                             timeout=60)
        message = condition(dv, "Running")["message"]
        assert words in message, message
        assert phase(dv) != "Succeeded"
        assert "not-the-secret" not in json.dumps(dv)
