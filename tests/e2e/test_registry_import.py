"""Registry DataVolumes end to end: containerdisks published with `cdi containerdisk
push` to a real docker-registry, imported through `cdi serve`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from importer import containerdisk, qemu_img
from tests.e2e.conftest import Server, condition, phase
from tests.e2e.test_datavolume import volume_of
from tests.support import images
from tests.support.registry import Registry
from tests.support.tls import TLSFiles, make_ca, write_tls_files

MiB = 1 << 20


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return write_tls_files(tmp_path_factory.mktemp("tls"), make_ca())


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory,
                 tls_files: TLSFiles) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("reg-tls"), tls=tls_files,
                   htpasswd={"alice": "s3cret"}).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("reg-plain")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("disk")
    return images.make_raw(d / "disk.raw", virtual_size=48 * MiB,
                           extents=[(0, MiB), (30 * MiB, 2 * MiB)])


def _push(server: Server, disk: Path, destination: str, *extra: str,
          password: str | None = None) -> str:
    p = server.cli("containerdisk", "push", str(disk), destination, *extra,
                   input=None if password is None else password + "\n")
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _dv(name: str, url: str, **registry: Any) -> dict[str, Any]:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name},
            "spec": {"source": {"registry": {"url": url, **registry}},
                     "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}


def _secret(server: Server, name: str, data: dict[str, str], type_: str = "Opaque") -> None:
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": type_,
           "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    assert server.create(obj).status_code == 201


def _ca_config_map(server: Server, tls: TLSFiles) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "registry-ca"},
          "data": {"ca.crt": Path(tls.ca_cert).read_text()}}
    assert server.create(cm).status_code == 201


def test_import_over_tls_with_credentials_and_labels(server: Server, tls_registry: Registry,
                                                     tls_files: TLSFiles, disk: Path,
                                                     tmp_path: Path) -> None:
    qcow2 = images.convert(disk, tmp_path / "disk.qcow2", "qcow2")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text(Path(tls_files.ca_cert).read_text())
    ref = f"docker://{tls_registry.ref('golden/fedora', 'v1')}"
    digest = _push(server, qcow2, ref, "--username", "alice", "--password-stdin",
                   "--cert-dir", str(certs),
                   "--env", "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora",
                   password="s3cret")
    assert digest.startswith("sha256:")
    _ca_config_map(server, tls_files)
    _secret(server, "pull", {"accessKeyId": "alice", "secretKey": "s3cret"})
    assert server.create(_dv("fedora", ref, secretRef="pull",
                             certConfigMap="registry-ca")).status_code == 201
    dv = server.wait_for("dv", "fedora", lambda o: phase(o) in ("Succeeded", "Failed"),
                         timeout=90)
    assert phase(dv) == "Succeeded", dv["status"]
    assert qemu_img.compare(str(disk), str(volume_of(server, "fedora")))
    pvc = server.get("pvc", "fedora")
    assert pvc["metadata"]["labels"]["instancetype.kubevirt.io/default-preference"] == "fedora"
    assert pvc["metadata"]["annotations"]["cdi.kubevirt.io/storage.import.source"] == "registry"
    # By digest too, with a .dockerconfigjson pull secret.
    auth = base64.b64encode(b"alice:s3cret").decode()
    _secret(server, "dockercfg", {".dockerconfigjson": json.dumps(
        {"auths": {tls_registry.host: {"auth": auth}}})}, "kubernetes.io/dockerconfigjson")
    by_digest = f"docker://{tls_registry.host}/golden/fedora@{digest}"
    assert server.create(_dv("pinned", by_digest, secretRef="dockercfg",
                             certConfigMap="registry-ca")).status_code == 201
    dv = server.wait_for("dv", "pinned", lambda o: phase(o) in ("Succeeded", "Failed"),
                         timeout=90)
    assert phase(dv) == "Succeeded", dv["status"]
    assert qemu_img.compare(str(disk), str(volume_of(server, "pinned")))


def test_wrong_credentials_and_unknown_tag_fail_to_pull(server: Server,
                                                        tls_registry: Registry,
                                                        tls_files: TLSFiles, disk: Path) -> None:
    _ca_config_map(server, tls_files)
    _secret(server, "wrong", {"accessKeyId": "alice", "secretKey": "nope"})
    ref = f"docker://{tls_registry.ref('golden/fedora', 'v1')}"
    assert server.create(_dv("denied", ref, secretRef="wrong",
                             certConfigMap="registry-ca")).status_code == 201
    missing = f"docker://{tls_registry.ref('golden/fedora', 'no-such-tag')}"
    _secret(server, "right", {"accessKeyId": "alice", "secretKey": "s3cret"})
    assert server.create(_dv("notag", missing, secretRef="right",
                             certConfigMap="registry-ca")).status_code == 201
    for name in ("denied", "notag"):
        dv = server.wait_for("dv", name,
                             lambda o: condition(o, "Running").get("reason") == "ImagePullFailed",
                             timeout=60)
        message = condition(dv, "Running")["message"]
        assert "failed to pull image" in message, message
        assert phase(dv) != "Succeeded"
        assert "s3cret" not in json.dumps(dv) and "nope" not in json.dumps(dv)


def test_plain_http_registry_needs_the_insecure_registries_entry(
        server: Server, plain_registry: Registry, disk: Path) -> None:
    ref = f"docker://{plain_registry.ref('tools/disk')}"
    _push(server, disk, ref, "--insecure", "--compression", "zstd")
    assert server.create(_dv("refused", ref)).status_code == 201
    dv = server.wait_for("dv", "refused",
                         lambda o: condition(o, "Running").get("reason") == "ImagePullFailed",
                         timeout=60)
    assert phase(dv) != "Succeeded"
    r = server.session.patch(server.path("cdiconfig", "config", ""), timeout=10,
                             json={"spec": {"insecureRegistries": [plain_registry.host]}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    assert server.create(_dv("allowed", ref)).status_code == 201
    dv = server.wait_for("dv", "allowed", lambda o: phase(o) in ("Succeeded", "Failed"),
                         timeout=90)
    assert phase(dv) == "Succeeded", dv["status"]
    assert qemu_img.compare(str(disk), str(volume_of(server, "allowed")))


def test_a_corrupted_blob_never_succeeds(server: Server, plain_registry: Registry,
                                        disk: Path, tmp_path: Path) -> None:
    other = images.make_raw(tmp_path / "other.raw", virtual_size=48 * MiB,
                            extents=[(0, 2 * MiB)], seed=3)
    ref = f"docker://{plain_registry.ref('tools/tampered')}"
    _push(server, other, ref, "--insecure", "--compression", "none")
    # Flip bytes in the largest blob (the disk layer) in the registry's storage.
    blobs = sorted(plain_registry.storage.rglob("data"), key=lambda p: p.stat().st_size)
    layer = blobs[-1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    r = server.session.patch(server.path("cdiconfig", "config", ""), timeout=10,
                             json={"spec": {"insecureRegistries": [plain_registry.host]}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200
    assert server.create(_dv("tampered", ref)).status_code == 201
    dv = server.wait_for("dv", "tampered",
                         lambda o: "digest" in condition(o, "Running").get("message", ""),
                         timeout=60)
    assert phase(dv) != "Succeeded"
    assert "failed to pull image" in condition(dv, "Running")["message"]


def _allow(server: Server, reg: Registry) -> None:
    r = server.session.patch(server.path("cdiconfig", "config", ""), timeout=10,
                             json={"spec": {"insecureRegistries": [reg.host]}},
                             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text


def _push_images(reg: Registry, repo: str, imgs: list[containerdisk.Image]) -> None:
    pusher = containerdisk.Pusher(reg.ref(repo), insecure=True)
    try:
        pusher.push(imgs)
    finally:
        pusher.close()


def test_layer_rules_and_architectures(server: Server, plain_registry: Registry, disk: Path,
                                       tmp_path: Path) -> None:
    """Multi-arch index, two layers with a disk each (the base one wins, as in CDI), a
    gzipped disk file in an uncompressed layer, and an image with no disk."""
    work = tmp_path / "work"
    work.mkdir()
    other = images.make_raw(tmp_path / "other.raw", virtual_size=48 * MiB,
                            extents=[(MiB, MiB)], seed=5)
    gz = images.compress(disk, "gz")

    def img(*disks: Path, arch: str | None = None, compression: str = "gzip"
            ) -> containerdisk.Image:
        layers = [containerdisk.layer(work, containerdisk.disk_entries(d),
                                      compression=compression) for d in disks]
        return containerdisk.image(layers, architecture=arch)

    _push_images(plain_registry, "multi/arch", [img(other, arch="arm64"), img(disk)])
    _push_images(plain_registry, "two/layers", [img(disk, other)])
    _push_images(plain_registry, "gz/inside", [img(gz, compression="none")])
    _push_images(plain_registry, "no/disk", [containerdisk.image([containerdisk.layer(
        work, containerdisk.files_entries({"etc/motd": b"hello\n"}))])])
    _allow(server, plain_registry)
    for name, repo in (("multi", "multi/arch"), ("layers", "two/layers"),
                       ("gzinside", "gz/inside"), ("nodisk", "no/disk")):
        url = f"docker://{plain_registry.ref(repo)}"
        assert server.create(_dv(name, url)).status_code == 201
    for name in ("multi", "layers", "gzinside"):
        dv = server.wait_for("dv", name, lambda o: phase(o) in ("Succeeded", "Failed"),
                             timeout=90)
        assert phase(dv) == "Succeeded", (name, dv["status"])
        assert qemu_img.compare(str(disk), str(volume_of(server, name))), name
    dv = server.wait_for("dv", "nodisk",
                         lambda o: "Failed to find VM disk image file in the container image"
                         in condition(o, "Running").get("message", ""), timeout=60)
    assert phase(dv) != "Succeeded"


def test_node_pull_is_refused_on_the_embedded_backend(server: Server,
                                                      plain_registry: Registry) -> None:
    url = f"docker://{plain_registry.ref('tools/disk')}"
    assert server.create(_dv("nodepull", url, pullMethod="node")).status_code == 201
    dv = server.wait_for("dv", "nodepull",
                         lambda o: condition(o, "Running").get("reason") == "UnsupportedSource")
    assert (phase(dv), condition(dv, "Running")["message"]) == (
        "Pending", "registry pullMethod node is not supported on the embedded backend; "
                   "use pullMethod pod (the default)")
    r = server.session.get(server.path("pvc", "nodepull"), timeout=10)
    assert r.status_code == 404, "nothing is provisioned for it"


def test_a_missing_pull_secret_is_named(server: Server, plain_registry: Registry,
                                        disk: Path) -> None:
    url = f"docker://{plain_registry.ref('tools/disk')}"
    _push(server, disk, url, "--insecure")
    _allow(server, plain_registry)
    assert server.create(_dv("secretless", url, secretRef="typo")).status_code == 201
    dv = server.wait_for("dv", "secretless", lambda o: condition(o, "Running").get("reason")
                         == "CreateContainerConfigError")
    assert condition(dv, "Running")["message"] == 'secret "typo" not found'
    _secret(server, "typo", {"accessKeyId": "", "secretKey": ""})
    dv = server.wait_for("dv", "secretless", lambda o: phase(o) in ("Succeeded", "Failed"),
                         timeout=90)
    assert phase(dv) == "Succeeded", dv["status"]
