"""Registry source against a real docker-registry: formats, auth, TLS, digests, resume."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from importer import containerdisk, oci, qemu_img
from importer.sources import registry as registry_source
from tests.importer.conftest import Importer, Result, Volume
from tests.support import images
from tests.support.cutter import Cutter
from tests.support.proxy import ForwardProxy
from tests.support.registry import Registry, TokenServer
from tests.support.tls import TLSFiles

MiB = 1 << 20
SIZE = str(64 * MiB)
VIRTUAL = 8 * MiB
NO_DISK = "Unable to process data: Failed to find VM disk image file in the container image"


@dataclasses.dataclass(frozen=True)
class Disks:
    raw: Path
    qcow2: Path
    raw_gz: Path
    other: Path  # different content, for multi-arch and later layers
    work: Path


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Disks:
    d = tmp_path_factory.mktemp("disks")
    raw = images.make_raw(d / "disk.raw", virtual_size=VIRTUAL,
                          extents=[(0, MiB), (5 * MiB, MiB), (VIRTUAL - 64 * 1024, 64 * 1024)])
    other = images.make_raw(d / "other.raw", virtual_size=VIRTUAL, extents=[(MiB, MiB)], seed=9)
    return Disks(raw, images.convert(raw, d / "disk.qcow2", "qcow2"),
                 images.compress(raw, "gz"), other, d / "work")


def _serve(reg: Registry) -> Iterator[Registry]:
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _serve(Registry(tmp_path_factory.mktemp("registry")))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory,
                 tls_files: TLSFiles) -> Iterator[Registry]:
    yield from _serve(Registry(tmp_path_factory.mktemp("registry-tls"), tls=tls_files))


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _serve(Registry(tmp_path_factory.mktemp("registry-basic"),
                               htpasswd={"alice": "s3cret"}))


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    server = TokenServer({"alice": ("s3cret", "pull,push")}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory,
                   token_server: TokenServer) -> Iterator[Registry]:
    yield from _serve(Registry(tmp_path_factory.mktemp("registry-token"), token=token_server))


def build(disks: Disks, disk: Path | None, *, compression: str = "gzip", media: str = "oci",
          before: Sequence[containerdisk.Layer] = (), after: Sequence[containerdisk.Layer] = (),
          env: Sequence[str] = (), labels: dict[str, str] | None = None,
          architecture: str | None = None, prefix: str = "") -> containerdisk.Image:
    layers = list(before)
    if disk is not None:
        entries = containerdisk.disk_entries(disk)
        for info, _ in entries:
            info.name = prefix + info.name
        layers.append(containerdisk.layer(disks.work, entries, compression=compression,
                                          media=media))
    layers += after
    return containerdisk.image(layers, media=media, env=env, labels=labels,
                               architecture=architecture)


def files_layer(disks: Disks, files: dict[str, bytes],
                extra: Sequence[containerdisk.Entry] = ()) -> containerdisk.Layer:
    return containerdisk.layer(disks.work, [*containerdisk.files_entries(files), *extra])


def push(reg: Registry, repo: str, imgs: Sequence[containerdisk.Image], *,
         media: str = "oci", tag: str = "latest", username: str | None = None,
         password: str | None = None) -> str:
    pusher = containerdisk.Pusher(reg.ref(repo, tag), insecure=reg.tls is None,
                                  username=username, password=password)
    try:
        return pusher.push(imgs, media=media)
    finally:
        pusher.close()


def pull(import_in_process: Importer, vol: Volume, endpoint: str, **env: str) -> Result:
    env.setdefault("IMPORTER_INSECURE_REGISTRY", "true")
    env.setdefault("IMPORTER_IMAGE_SIZE", SIZE)
    return import_in_process(vol, IMPORTER_SOURCE="registry", IMPORTER_ENDPOINT=endpoint, **env)


def _ok(result: Result) -> None:
    assert result.code == 0, result.message
    assert result.json["message"] == "Import Complete"


def _same(a: Path, b: Path) -> None:
    assert qemu_img.compare(str(a), str(b))


# -- formats and targets ----------------------------------------------------------------


@pytest.mark.parametrize("block", [False, True], ids=["filesystem", "block"])
@pytest.mark.parametrize("kind,compression", [
    ("raw", "none"), ("raw", "gzip"), ("raw", "zstd"), ("raw_gz", "none"), ("qcow2", "gzip"),
    ("qcow2", "zstd"),
])
def test_formats(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                 import_in_process: Importer, kind: str, compression: str, block: bool) -> None:
    repo = f"formats/{kind.replace('_', '-')}-{compression}"
    push(registry, repo, [build(disks, getattr(disks, kind), compression=compression)])
    vol = volume(block=block, block_size=32 * MiB)
    _ok(pull(import_in_process, vol, f"docker://{registry.ref(repo)}"))
    _same(disks.raw, vol.disk)
    if block:
        assert vol.disk.stat().st_size == 32 * MiB
    else:
        assert vol.disk.stat().st_size == 64 * MiB, "resized to the requested size"
    assert list(vol.scratch_dir.iterdir()) in ([], [vol.scratch_dir / "disk"])
    assert not any((vol.scratch_dir / "disk").glob("*")), "scratch image removed"


def test_raw_needs_no_scratch_and_qcow2_does(registry: Registry, disks: Disks,
                                            volume: Callable[..., Volume],
                                            import_in_process: Importer) -> None:
    push(registry, "scratch/raw", [build(disks, disks.raw)])
    push(registry, "scratch/qcow2", [build(disks, disks.qcow2)])
    vol = volume(scratch=False)
    _ok(pull(import_in_process, vol, f"docker://{registry.ref('scratch/raw')}"))
    _same(disks.raw, vol.disk)
    vol = volume(scratch=False)
    result = pull(import_in_process, vol, f"docker://{registry.ref('scratch/qcow2')}")
    assert result.json == {"scratchSpaceRequired": True,
                           "message": "scratch space required and none found"}


def test_tag_and_digest(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                        import_in_process: Importer) -> None:
    digest = push(registry, "refs/disk", [build(disks, disks.other)], tag="v1")
    push(registry, "refs/disk", [build(disks, disks.raw)])
    for ref, expected in ((f"refs/disk@{digest}", disks.other), ("refs/disk:v1", disks.other),
                          ("refs/disk", disks.raw)):
        vol = volume()
        _ok(pull(import_in_process, vol, f"docker://{registry.host}/{ref}"))
        _same(expected, vol.disk)
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.host}/refs/disk:nope")
    assert result.code == 1
    assert result.message == ("Unable to process data: failed to pull image: reading manifest "
                              f"nope in {registry.host}/refs/disk: manifest unknown: "
                              "manifest unknown")


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_multi_arch(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                    import_in_process: Importer, media: str) -> None:
    amd = build(disks, disks.raw, media=media, architecture="amd64")
    arm = build(disks, disks.other, media=media, architecture="arm64")
    repo = f"multiarch/{media}"
    push(registry, repo, [amd, arm], media=media)
    ref = f"docker://{registry.ref(repo)}"
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="arm64"))
    _same(disks.other, vol.disk)
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="amd64"))
    _same(disks.raw, vol.disk)
    if oci.machine_architecture() in ("amd64", "arm64"):
        vol = volume()
        _ok(pull(import_in_process, vol, ref))  # this machine's architecture
        _same(disks.raw if oci.machine_architecture() == "amd64" else disks.other, vol.disk)
    vol = volume()
    result = pull(import_in_process, vol, ref, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="s390x")
    assert (result.code, result.message) == (1, (
        "Unable to process data: failed to pull image: choosing image instance: no image found "
        "in image index for architecture \"s390x\", OS \"linux\"; the index has: linux/amd64, "
        "linux/arm64"))
    assert not vol.disk.exists()


def test_architecture_of_a_single_image_must_match(registry: Registry, disks: Disks,
                                                   volume: Callable[..., Volume],
                                                   import_in_process: Importer) -> None:
    push(registry, "arch/single", [build(disks, disks.raw, architecture="amd64")])
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref('arch/single')}",
                  IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="arm64")
    assert (result.code, result.message) == (1, (
        "Unable to process data: Error validating architecture: manifest image architecture: "
        "\"amd64\" doesn't match requested architecture: \"arm64\""))


# -- auth and transport ---------------------------------------------------------------------


def test_basic_auth(basic_registry: Registry, disks: Disks, volume: Callable[..., Volume],
                    import_in_process: Importer) -> None:
    push(basic_registry, "basic/disk", [build(disks, disks.raw)], username="alice",
         password="s3cret")
    ref = f"docker://{basic_registry.ref('basic/disk')}"
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_ACCESS_KEY_ID="alice",
             IMPORTER_SECRET_KEY="s3cret"))
    _same(disks.raw, vol.disk)
    refused = ("Unable to process data: failed to pull image: reading manifest latest in "
               f"{basic_registry.host}/basic/disk: unauthorized: authentication required")
    for creds in ({"IMPORTER_ACCESS_KEY_ID": "alice", "IMPORTER_SECRET_KEY": "wrong"}, {}):
        vol = volume()
        result = pull(import_in_process, vol, ref, **creds)
        assert (result.code, result.message) == (1, refused)
        assert not vol.disk.exists()


def test_token_auth(token_registry: Registry, token_server: TokenServer, disks: Disks,
                    volume: Callable[..., Volume], import_in_process: Importer) -> None:
    push(token_registry, "tok/disk", [build(disks, disks.raw)], username="alice",
         password="s3cret")
    assert token_server.requests[-1].scopes == ["repository:tok/disk:pull,push"]
    ref = f"docker://{token_registry.ref('tok/disk')}"
    token_server.requests.clear()
    token_server.field = "access_token"  # the other name clients must read
    try:
        vol = volume()
        _ok(pull(import_in_process, vol, ref, IMPORTER_ACCESS_KEY_ID="alice",
                 IMPORTER_SECRET_KEY="s3cret"))
    finally:
        token_server.field = "token"
    _same(disks.raw, vol.disk)
    assert [(r.account, r.scopes, r.status) for r in token_server.requests] == [
        ("alice", ["repository:tok/disk:pull"], 200)]
    vol = volume()
    result = pull(import_in_process, vol, ref, IMPORTER_ACCESS_KEY_ID="alice",
                  IMPORTER_SECRET_KEY="wrong")
    assert (result.code, result.message) == (1, (
        "Unable to process data: failed to pull image: unable to retrieve auth token: invalid "
        "username/password: unauthorized: invalid credentials"))
    vol = volume()  # anonymous: a token without access, refused by the registry
    result = pull(import_in_process, vol, ref)
    assert (result.code, result.message) == (1, (
        "Unable to process data: failed to pull image: reading manifest latest in "
        f"{token_registry.host}/tok/disk: unauthorized: authentication required"))


def test_tls(tls_registry: Registry, tls_files: TLSFiles, disks: Disks,
             volume: Callable[..., Volume], import_in_process: Importer) -> None:
    pusher = containerdisk.Pusher(tls_registry.ref("tls/disk"), cert_dir=tls_files.ca_dir)
    pusher.push([build(disks, disks.raw)])
    pusher.close()
    ref = f"docker://{tls_registry.ref('tls/disk')}"
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_CERT_DIR=str(tls_files.ca_dir),
             IMPORTER_INSECURE_REGISTRY="false"))
    _same(disks.raw, vol.disk)
    vol = volume()  # the proxies' CA directory is trusted as well
    _ok(pull(import_in_process, vol, ref, IMPORTER_PROXY_CERT_DIR=str(tls_files.ca_dir),
             IMPORTER_INSECURE_REGISTRY="false"))
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_INSECURE_REGISTRY="true"))  # unverified
    vol = volume()
    result = pull(import_in_process, vol, ref, IMPORTER_INSECURE_REGISTRY="false")
    assert (result.code, result.message) == (1, (
        f"Unable to process data: failed to pull image: pinging container registry "
        f"{tls_registry.host}: TLS certificate verification failed: unable to get local "
        "issuer certificate"))


def test_plain_http_needs_insecure_registry(registry: Registry, disks: Disks,
                                            volume: Callable[..., Volume],
                                            import_in_process: Importer) -> None:
    push(registry, "plain/disk", [build(disks, disks.raw)])
    ref = f"docker://{registry.ref('plain/disk')}"
    vol = volume()
    result = pull(import_in_process, vol, ref, IMPORTER_INSECURE_REGISTRY="false")
    assert (result.code, result.message) == (1, (
        f"Unable to process data: failed to pull image: pinging container registry "
        f"{registry.host}: TLS error: wrong version number"))
    vol = volume()
    _ok(pull(import_in_process, vol, ref, IMPORTER_INSECURE_REGISTRY="true"))
    _same(disks.raw, vol.disk)


def test_through_proxy(registry: Registry, disks: Disks, forward_proxy: ForwardProxy,
                       volume: Callable[..., Volume], import_in_process: Importer) -> None:
    push(registry, "proxied/disk", [build(disks, disks.raw)])
    vol = volume()
    _ok(pull(import_in_process, vol, f"docker://{registry.ref('proxied/disk')}",
             http_proxy=forward_proxy.url, https_proxy=forward_proxy.url))
    _same(disks.raw, vol.disk)
    seen = forward_proxy.requests()
    assert f"GET http://{registry.host}/v2/proxied/disk/manifests/latest" in seen
    assert any(r.startswith(f"GET http://{registry.host}/v2/proxied/disk/blobs/") for r in seen)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_tampered_blob(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                       import_in_process: Importer, tmp_path: Path, compression: str) -> None:
    disk = images.make_raw(tmp_path / "tamper.raw", virtual_size=4 * MiB,
                           extents=[(0, 3 * MiB)], seed=len(compression))
    img = build(disks, disk, compression=compression)
    push(registry, f"tamper/{compression}", [img])
    layer_digest = img.layers[0].blob.digest
    stored = registry.blob_path(layer_digest)
    data = bytearray(stored.read_bytes())
    data[2 * MiB: 2 * MiB + 16] = bytes(b ^ 0xFF for b in data[2 * MiB: 2 * MiB + 16])
    stored.write_bytes(bytes(data))  # same size, other bytes
    for block in (False, True):
        vol = volume(block=block, block_size=16 * MiB)
        result = pull(import_in_process, vol, f"docker://{registry.ref(f'tamper/{compression}')}")
        assert result.code == 1
        assert result.message.startswith(
            f"Unable to process data: failed to pull image: blob {layer_digest}: digest "
            f"mismatch: expected {layer_digest}, calculated sha256:")
        if block:
            assert images.allocated_bytes(vol.disk) == 0, "what was written is discarded"
        else:
            assert not vol.disk.exists()


def test_resume_after_cut(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                          import_in_process: Importer,
                          caplog: pytest.LogCaptureFixture) -> None:
    img = build(disks, disks.raw, compression="none")  # an 8 MiB layer
    push(registry, "resume/disk", [img])
    relay = Cutter(registry.port, cut_after=3 * MiB, cut_times=2).start()
    try:
        vol = volume()
        with caplog.at_level(logging.WARNING, logger="importer.sources.registry"):
            # The relay's reset reaches us only when we give up on the connection (it
            # closes a socket its other thread is blocked on): a short stall timeout.
            _ok(pull(import_in_process, vol, f"docker://127.0.0.1:{relay.port}/resume/disk",
                     IMPORTER_STALL_TIMEOUT="0.5"))
        seen = relay.requests()
    finally:
        relay.stop()
    _same(disks.raw, vol.disk)
    assert relay.cuts == 2
    blob = img.layers[0].blob.digest
    ranges = [r.headers.get("range") for r in seen if r.path.endswith(f"/blobs/{blob}")]
    assert len(ranges) == 3 and ranges[0] is None
    offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:] if r]
    assert len(offsets) == 2 and 0 < offsets[0] < offsets[1] < img.layers[0].blob.size
    assert sum("RESUME" in r.getMessage() for r in caplog.records) == 2


# -- what is in the image -------------------------------------------------------------------


def test_no_disk(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                 import_in_process: Importer) -> None:
    layers = [files_layer(disks, {"etc/": b"", "etc/motd": b"hello\n", "diskette": b"no"})]
    push(registry, "nodisk/img", [build(disks, None, before=layers)])
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref('nodisk/img')}")
    assert (result.code, result.message) == (1, NO_DISK)


@pytest.mark.parametrize("prefix", ["", "./"])
def test_first_disk_wins_whiteouts_and_links_skipped(registry: Registry, disks: Disks,
                                                      volume: Callable[..., Volume],
                                                      import_in_process: Importer,
                                                      prefix: str) -> None:
    base = files_layer(disks, {"etc/": b"", "etc/motd": b"hello\n"})
    junk = containerdisk.Layer(containerdisk.Blob.of(
        "application/vnd.oci.image.layer.v1.tar", b"not a tar at all " * 100), "sha256:" + "0" * 64)
    entries: list[containerdisk.Entry] = [
        (containerdisk.entry("disk/.wh.old.img", size=3), b"old"),
        (containerdisk.entry("disk/sub", kind=tarfile.DIRTYPE), None),
        (containerdisk.entry("disk/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), None),
        *containerdisk.disk_entries(disks.qcow2),
    ]
    for info, _ in entries:
        info.name = prefix + info.name
    first_disk_layer = containerdisk.layer(disks.work, entries)
    later = containerdisk.layer(disks.work, containerdisk.disk_entries(disks.other))
    img = containerdisk.image([base, junk, first_disk_layer, later])
    repo = f"layers/first{'-dot' if prefix else ''}"
    push(registry, repo, [img])
    vol = volume()
    _ok(pull(import_in_process, vol, f"docker://{registry.ref(repo)}"))
    _same(disks.raw, vol.disk)
    reads = {a.path for a in registry.accesses() if a.method == "GET"}
    assert f"/v2/{repo}/blobs/{first_disk_layer.blob.digest}" in reads
    assert f"/v2/{repo}/blobs/{later.blob.digest}" not in reads, "layers above are never read"


def test_labels_from_env(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                         import_in_process: Importer) -> None:
    env = ["PATH=/usr/bin", "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
           "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora", "KUBEVIRT_IO_OS=linux",
           "NOTAVALIDENV"]
    push(registry, "labels/disk", [build(disks, disks.raw, env=env)])
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref('labels/disk')}")
    _ok(result)
    assert result.json["labels"] == {
        "instancetype.kubevirt.io/default-instancetype": "u1.small",
        "instancetype.kubevirt.io/default-preference": "fedora",
        "kubevirt.io/os": "linux",
    }


@pytest.mark.parametrize("label", ["containers.bootc", "ostree.bootable"])
def test_bootc_refused(registry: Registry, disks: Disks, volume: Callable[..., Volume],
                       import_in_process: Importer, label: str) -> None:
    push(registry, f"bootc/{label}", [build(disks, disks.raw, labels={label: "1"})])
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref(f'bootc/{label}')}")
    assert result.code == 1
    assert result.message == "Unable to process data: " + str(registry_source.BootcImage())
    assert result.message.startswith("Unable to process data: bootc image detected: ")


def test_archive_content_type_refused(registry: Registry, volume: Callable[..., Volume],
                                      import_in_process: Importer) -> None:
    vol = volume()
    result = pull(import_in_process, vol, f"docker://{registry.ref('any/img')}",
                  IMPORTER_CONTENTTYPE="archive")
    assert (result.code, result.message) == (1, (
        "IMPORTER_CONTENTTYPE: Unsupported content type archive when importing from registry"))
    assert not [a for a in registry.accesses() if "any/img" in a.path], "nothing was asked"


def test_image_larger_than_block_volume(registry: Registry, disks: Disks,
                                        volume: Callable[..., Volume],
                                        import_in_process: Importer) -> None:
    push(registry, "big/disk", [build(disks, disks.raw, compression="none")])
    vol = volume(block=True, block_size=4 * MiB)
    result = pull(import_in_process, vol, f"docker://{registry.ref('big/disk')}")
    assert (result.code, result.message) == (1, (
        "Unable to process data: virtual image size 8388608 is larger than the reported "
        "available storage 4194304. A larger PVC is required"))


def test_oci_archive(disks: Disks, tmp_path: Path, volume: Callable[..., Volume],
                     import_in_process: Importer) -> None:
    amd = build(disks, disks.qcow2, architecture="amd64")
    arm = build(disks, disks.other, architecture="arm64")
    archive = containerdisk.write_oci_archive([amd, arm], tmp_path / "image.tar", name="v1")
    for endpoint in (f"oci-archive:{archive}", f"oci-archive:{archive}:v1"):
        vol = volume()
        _ok(pull(import_in_process, vol, endpoint, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="arm64"))
        _same(disks.other, vol.disk)
        vol = volume()
        _ok(pull(import_in_process, vol, endpoint, IMPORTER_REGISTRY_IMAGE_ARCHITECTURE="amd64"))
        _same(disks.raw, vol.disk)
    vol = volume()
    result = pull(import_in_process, vol, f"oci-archive:{archive}:v2")
    assert (result.code, result.message) == (1, (
        f"Unable to process data: failed to pull image: oci-archive:{archive}:v2: no image "
        "named 'v2' in index.json"))


# -- the pieces, table-driven ---------------------------------------------------------------


@pytest.mark.parametrize("env,label", [
    ("KUBEVIRT_IO_TEST", "kubevirt.io/test"),
    ("KUBEVIRT_IO_TEST_TEST", "kubevirt.io/test-test"),
    ("TEST_KUBEVIRT_IO_TEST", "test.kubevirt.io/test"),
    ("TEST_TEST_KUBEVIRT_IO_TEST", "test.test.kubevirt.io/test"),
    ("TEST_TEST_KUBEVIRT_IO_TEST_TEST", "test.test.kubevirt.io/test-test"),
    ("INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE", "instancetype.kubevirt.io/default-preference"),
])
def test_env_to_label(env: str, label: str) -> None:
    assert registry_source.env_to_label(env) == label


def test_labels_ignore_other_env() -> None:
    assert registry_source.labels_from_env(["SOMETHING_ELSE_IO=testval", "NOTAVALIDENVVAR",
                                            "KUBEVIRT_IO_A=x=y"]) == {"kubevirt.io/a": "x=y"}


@pytest.mark.parametrize("text,expected", [
    ("docker://ubuntu", ("registry-1.docker.io", "library/ubuntu", "latest", None)),
    ("docker://docker.io/kubevirt/fedora:39",
     ("registry-1.docker.io", "kubevirt/fedora", "39", None)),
    ("docker://quay.io/containerdisks/fedora:41",
     ("quay.io", "containerdisks/fedora", "41", None)),
    ("docker://127.0.0.1:5000/a/b", ("127.0.0.1:5000", "a/b", "latest", None)),
    ("docker://localhost/disk:v1.2-rc", ("localhost", "disk", "v1.2-rc", None)),
    ("docker://r.io:443/a@sha256:" + "a" * 64, ("r.io:443", "a", None, "sha256:" + "a" * 64)),
    ("docker://r.io/a:t@sha256:" + "b" * 64, ("r.io", "a", "t", "sha256:" + "b" * 64)),
])
def test_parse_reference(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = oci.parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["docker://Upper/Case", "docker://r.io/a@sha256:12",
                                  "docker://r.io/a:b:c", "docker://"])
def test_parse_reference_refuses(text: str) -> None:
    with pytest.raises(oci.InvalidReference, match="IMPORTER_ENDPOINT: invalid image reference"):
        oci.parse_reference(text)


@pytest.mark.parametrize("header,expected", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/ubuntu:pull,push"',
     ("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                 "scope": "repository:library/ubuntu:pull,push"})),
    ('Basic realm="test-registry"', ("basic", {"realm": "test-registry"})),
    ("Negotiate", ("", {})),
])
def test_parse_challenge(header: str, expected: tuple[str, dict[str, str]]) -> None:
    assert oci.parse_challenge(header) == expected


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("doc,host,expected", [
    ({"auths": {"quay.io": {"auth": _auth("u", "p:w")}}}, "quay.io", ("u", "p:w")),
    ({"auths": {"https://quay.io/v1/": {"username": "u", "password": "p"}}}, "quay.io",
     ("u", "p")),
    ({"auths": {"https://index.docker.io/v1/": {"auth": _auth("d", "x")}}},
     "registry-1.docker.io", ("d", "x")),
    ({"auths": {"docker.io": {"auth": _auth("d", "x")}}}, "index.docker.io", ("d", "x")),
    ({"auths": {"r.io:5000": {"auth": _auth("a", "b")}}}, "r.io:5000", ("a", "b")),
    ({"auths": {"r.io:5000": {"auth": _auth("a", "b")}}}, "r.io", None),
    ({"r.io": {"auth": _auth("legacy", "cfg")}}, "r.io", ("legacy", "cfg")),
    ({"auths": {"r.io": {"identitytoken": "t"}}}, "r.io", None),
])
def test_credentials_from_dockerconfig(doc: dict[str, object], host: str,
                                       expected: tuple[str, str] | None) -> None:
    assert oci.credentials_from_dockerconfig(json.dumps(doc), host) == expected


def test_credentials_from_bad_dockerconfig() -> None:
    with pytest.raises(Exception, match="not valid JSON"):
        oci.credentials_from_dockerconfig("{", "r.io")
    with pytest.raises(Exception, match="is not base64"):
        oci.credentials_from_dockerconfig('{"auths": {"r.io": {"auth": "%%%"}}}', "r.io")
