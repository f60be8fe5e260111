"""The containerdisk publisher: what it pushes, how, and that the registry source reads it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from importer import containerdisk, oci, qemu_img
from importer.sources import registry as registry_source
from tests.importer.conftest import Importer, Result, Volume
from tests.support import images
from tests.support.registry import Registry, TokenServer
from tests.support.tls import TLSFiles

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cd-disks")
    raw = images.make_raw(d / "disk.raw", virtual_size=6 * MiB, extents=[(0, MiB), (4 * MiB, MiB)],
                          seed=3)
    return raw


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("cd-registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


def pull(import_in_process: Importer, vol: Volume, endpoint: str, **env: str) -> Result:
    return import_in_process(vol, IMPORTER_SOURCE="registry", IMPORTER_ENDPOINT=endpoint,
                             IMPORTER_IMAGE_SIZE=str(16 * MiB), **env)


def _ok(result: Result) -> None:
    assert result.code == 0, result.message


def _get(reg: Registry, path: str, accept: str = oci.ACCEPT) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False  # no proxy or CA bundle from the environment
        r = s.get(f"http://{reg.host}{path}", headers={"Accept": accept}, timeout=10)
    assert r.status_code == 200, r.text
    return r


def _layer_members(blob: bytes, compression: str) -> list[tarfile.TarInfo]:
    decompress: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.decompress, "zstd": zstd.decompress, "none": bytes}
    data = decompress[compression](blob)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("media,compression", [("oci", "gzip"), ("docker", "none"),
                                               ("oci", "zstd"), ("docker", "gzip")])
def test_round_trip(registry: Registry, disk: Path, volume: Callable[..., Volume],
                    import_in_process: Importer, media: str, compression: str) -> None:
    repo = f"rt/{media}-{compression}"
    digest = containerdisk.publish(disk, f"docker://{registry.ref(repo, 'v1')}", media=media,
                                   compression=compression, insecure=True,
                                   env=["KUBEVIRT_IO_OS=linux"], labels={"a": "b"})
    r = _get(registry, f"/v2/{repo}/manifests/v1")
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
    assert r.headers["Docker-Content-Digest"] == digest
    manifest = r.json()
    manifest_type, config_type, _ = containerdisk._TYPES[media]
    assert manifest["mediaType"] == manifest_type == r.headers["Content-Type"]
    assert manifest["config"]["mediaType"] == config_type
    [layer] = manifest["layers"]
    assert layer["mediaType"] == containerdisk._LAYER_TYPES[(media, compression)]
    config = _get(registry, f"/v2/{repo}/blobs/{manifest['config']['digest']}").json()
    assert config["architecture"] == oci.machine_architecture()
    assert config["os"] == "linux"
    assert config["config"] == {"Env": ["KUBEVIRT_IO_OS=linux"], "Labels": {"a": "b"}}
    blob = _get(registry, f"/v2/{repo}/blobs/{layer['digest']}").content
    members = _layer_members(blob, compression)
    assert [(m.name, m.isdir(), m.uid, m.gid, m.mode) for m in members] == [
        ("disk", True, 107, 107, 0o555), ("disk/disk.raw", False, 107, 107, 0o440)]
    assert members[1].size == disk.stat().st_size
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref(repo, 'v1')}",
                  IMPORTER_INSECURE_REGISTRY="true")
    _ok(result)
    assert result.json["labels"] == {"kubevirt.io/os": "linux"}
    assert qemu_img.compare(str(disk), str(vol.disk))


def test_chunked_upload_and_existing_blobs(registry: Registry, disk: Path, tmp_path: Path,
                                          volume: Callable[..., Volume],
                                          import_in_process: Importer) -> None:
    qcow2 = images.convert(disk, tmp_path / "disk.qcow2", "qcow2")
    before = len(registry.accesses())
    containerdisk.publish(qcow2, registry.ref("chunked/disk"), compression="none",
                          insecure=True, chunk_size=MiB)
    pushed = registry.accesses()[before:]
    patches = [a for a in pushed if a.method == "PATCH"]
    # the layer (about 2 MiB of qcow2 in a tar) in 1 MiB chunks, the config in one
    assert len(patches) >= 3 and all(a.status == 202 for a in patches)
    vol = volume()
    _ok(pull(import_in_process, vol, f"docker://{registry.ref('chunked/disk')}",
             IMPORTER_INSECURE_REGISTRY="true"))
    assert qemu_img.compare(str(disk), str(vol.disk))
    before = len(registry.accesses())
    containerdisk.publish(qcow2, registry.ref("chunked/disk", "again"), compression="none",
                          insecure=True)
    again = registry.accesses()[before:]
    assert [a.method for a in again if "/blobs/" in a.path] == ["HEAD", "HEAD"], \
        "blobs the registry has are not uploaded again"
    assert [(a.method, a.status) for a in again if "/manifests/" in a.path] == [("PUT", 201)]


def test_reproducible(disk: Path, tmp_path: Path) -> None:
    first = containerdisk.publish(disk, f"oci-archive:{tmp_path / 'a.tar'}")
    second = containerdisk.publish(disk, f"oci-archive:{tmp_path / 'b.tar'}")
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_push_with_basic_auth(tmp_path: Path, disk: Path, volume: Callable[..., Volume],
                              import_in_process: Importer) -> None:
    reg = Registry(tmp_path / "reg", htpasswd={"bob": "pw"}).start()
    try:
        ref = reg.ref("auth/disk")
        with pytest.raises(oci.RegistryError) as e:
            containerdisk.publish(disk, ref, insecure=True, username="bob", password="nope")
        assert str(e.value).startswith("failed to push image: uploading blob sha256:")
        assert str(e.value).endswith(": 401 Unauthorized")
        containerdisk.publish(disk, ref, insecure=True, username="bob", password="pw")
        vol = volume()
        _ok(pull(import_in_process, vol, f"docker://{ref}", IMPORTER_INSECURE_REGISTRY="true",
                 IMPORTER_ACCESS_KEY_ID="bob", IMPORTER_SECRET_KEY="pw"))
        assert qemu_img.compare(str(disk), str(vol.disk))
    finally:
        reg.stop()


def test_push_with_token_auth(tmp_path: Path, disk: Path, tls_files: TLSFiles,
                              volume: Callable[..., Volume],
                              import_in_process: Importer) -> None:
    tokens = TokenServer({"bob": ("pw", "pull,push"), "reader": ("r", "pull")}).start()
    reg = Registry(tmp_path / "reg", token=tokens, tls=tls_files).start()
    try:
        ref = reg.ref("tok/disk")
        with pytest.raises(oci.RegistryError, match=(
                r"^failed to push image: uploading blob sha256:[0-9a-f]{64}: "
                r"unauthorized: authentication required$")):
            containerdisk.publish(disk, ref, cert_dir=tls_files.ca_dir, username="reader",
                                  password="r")
        digest = containerdisk.publish(disk, ref, cert_dir=tls_files.ca_dir, username="bob",
                                       password="pw")
        assert ("bob", ["repository:tok/disk:pull,push"], 200) in [
            (r.account, r.scopes, r.status) for r in tokens.requests]
        vol = volume()
        _ok(pull(import_in_process, vol, f"docker://{reg.host}/tok/disk@{digest}",
                 IMPORTER_CERT_DIR=str(tls_files.ca_dir), IMPORTER_ACCESS_KEY_ID="reader",
                 IMPORTER_SECRET_KEY="r"))
        assert qemu_img.compare(str(disk), str(vol.disk))
    finally:
        reg.stop()
        tokens.stop()


def test_oci_archive_layout(disk: Path, tmp_path: Path, volume: Callable[..., Volume],
                            import_in_process: Importer) -> None:
    archive = tmp_path / "disk.tar"
    digest = containerdisk.publish(disk, f"oci-archive:{archive}:v7", compression="zstd",
                                   env=["A_KUBEVIRT_IO_B=c"])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        layout = json.load(tar.extractfile("oci-layout"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        for name in names:
            if name.startswith("blobs/sha256/"):
                data = tar.extractfile(name).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert index["mediaType"] == oci.OCI_INDEX
    [entry] = index["manifests"]
    assert entry["digest"] == digest
    assert entry["annotations"] == {oci.REF_NAME: "v7"}
    assert f"blobs/sha256/{digest.removeprefix('sha256:')}" in names
    assert len([n for n in names if n.startswith("blobs/")]) == 3  # manifest, config, layer
    vol = volume(block=True, block_size=8 * MiB)
    result = pull(import_in_process, vol, f"oci-archive:{archive}")
    _ok(result)
    assert result.json["labels"] == {"a.kubevirt.io/b": "c"}
    assert qemu_img.compare(str(disk), str(vol.disk))


def test_oci_archive_tampered_blob(disk: Path, tmp_path: Path, volume: Callable[..., Volume],
                                   import_in_process: Importer) -> None:
    good = tmp_path / "good.tar"
    containerdisk.publish(disk, f"oci-archive:{good}", compression="none")
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            f = src.extractfile(member)
            data = f.read() if f is not None else b""
            if member.size > MiB:  # the layer
                data = data[:MiB] + bytes([data[MiB] ^ 1]) + data[MiB + 1:]
            dst.addfile(member, io.BytesIO(data))
    vol = volume()
    result = pull(import_in_process, vol, f"oci-archive:{bad}")
    assert result.code == 1
    assert "digest mismatch" in result.message and result.message.startswith(
        "Unable to process data: failed to pull image: blob sha256:")
    assert not vol.disk.exists()


def test_multi_arch_publish(registry: Registry, disk: Path, tmp_path: Path,
                            volume: Callable[..., Volume], import_in_process: Importer) -> None:
    other = images.make_raw(tmp_path / "arm.raw", virtual_size=4 * MiB, extents=[(0, MiB)],
                            seed=5)
    ref = registry.ref("multi/disk")
    digest = containerdisk.publish({"amd64": disk, "arm64": other}, ref, insecure=True,
                                   media="docker")
    listing = _get(registry, "/v2/multi/disk/manifests/latest").json()
    assert listing["mediaType"] == oci.DOCKER_LIST
    assert [m["platform"] for m in listing["manifests"]] == [
        {"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"}]
    vol = volume()
    _ok(pull(import_in_process, vol, f"docker://{registry.host}/multi/disk@{digest}",
             IMPORTER_INSECURE_REGISTRY="true", IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="arm64"))
    assert qemu_img.compare(str(other), str(vol.disk))


def test_layer_of_files_is_not_a_disk(tmp_path: Path, volume: Callable[..., Volume],
                                      import_in_process: Importer) -> None:
    files = containerdisk.layer(tmp_path / "work", containerdisk.files_entries(
        {"disk/": b"", "disk/.wh.gone": b""}))
    img = containerdisk.image([files])
    archive = containerdisk.write_oci_archive([img], tmp_path / "img.tar")
    vol = volume()
    result = pull(import_in_process, vol, f"oci-archive:{archive}")
    assert (result.code, result.message) == (
        1, "Unable to process data: " + str(registry_source.NoDiskFound()))
