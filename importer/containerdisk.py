"""Publishing a containerdisk: a disk image packed as a container image, pushed or archived.

KubeVirt and CDI import VM disks from container images whose layer holds
``disk/<file>`` owned by qemu (107:107, mode 0440).  Users usually build them
with ``podman build`` from a two-line Containerfile; where neither podman nor
skopeo is installed, this module does the same with nothing but ``requests``:
it writes the layer (a tar, gzip- or zstd-compressed or not) to a work
directory while hashing it, builds the config (with ``Env`` for CDI's
``*_KUBEVIRT_IO_*`` labels) and the manifest (OCI or Docker schema 2), and
speaks the distribution API: HEAD to skip blobs the registry has, POST then a
monolithic PUT or chunked PATCHes, manifest PUT, optionally a multi-arch index.
``write_oci_archive`` writes the same image as an ``oci-archive`` tarball.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import sys
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

import requests
from isal import igzip

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from importer import oci, units
from importer.settings import Settings
from importer.sources import http

log = logging.getLogger(__name__)

QEMU_ID = 107  # uid and gid of qemu in KubeVirt's launcher
DISK_MODE = 0o440
MTIME = 0  # reproducible layers: the same disk gives the same digest
COMPRESSIONS = ("gzip", "zstd", "none")
MEDIA = ("oci", "docker")
_LAYER_TYPES = {
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "zstd"): "application/vnd.docker.image.rootfs.diff.tar.zstd",
}
_TYPES = {"oci": (oci.OCI_MANIFEST, oci.OCI_CONFIG, oci.OCI_INDEX),
          "docker": (oci.DOCKER_MANIFEST, oci.DOCKER_CONFIG, oci.DOCKER_LIST)}


@dataclasses.dataclass(frozen=True)
class Blob:
    """Content addressed by digest: a file in the work directory, or small bytes."""

    media_type: str
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)

    def descriptor(self, **platform: str) -> oci.Descriptor:
        return oci.Descriptor(self.media_type, self.digest, self.size, dict(platform))

    def open(self) -> BinaryIO:
        if self.path is not None:
            return self.path.open("rb")
        return io.BytesIO(self.data or b"")


@dataclasses.dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str  # digest of the uncompressed tar


@dataclasses.dataclass(frozen=True)
class Image:
    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    architecture: str
    os: str = "linux"

    def blobs(self) -> list[Blob]:
        return [layer.blob for layer in self.layers] + [self.config]


class _Hashing:
    """A write-only file that hashes and counts what passes to DST."""

    def __init__(self, dst: Any) -> None:
        self._dst = dst
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._dst.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def close(self) -> None:
        """Compressors close their file when they are closed; DST stays open."""


def _compressor(compression: str, dst: _Hashing) -> Any:
    if compression == "gzip":
        gzip_file: Any = igzip.IGzipFile  # untyped
        return gzip_file(fileobj=dst, mode="wb", mtime=MTIME)
    return zstd.ZstdFile(dst, mode="wb")


Entry = tuple[tarfile.TarInfo, "Path | bytes | None"]


def layer(workdir: Path, entries: Iterable[Entry], *, compression: str = "gzip",
          media: str = "oci") -> Layer:
    """Write a layer of ENTRIES (a TarInfo with a file, bytes or nothing) into WORKDIR."""
    if compression not in COMPRESSIONS or media not in MEDIA:
        raise ValueError(f"compression is one of {COMPRESSIONS}, media one of {MEDIA}")
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".layer-", delete=False) as out:
        tmp = Path(out.name)
        blob = _Hashing(out)
        compressor = _compressor(compression, blob) if compression != "none" else None
        diff = _Hashing(compressor) if compressor is not None else blob
        with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                          copybufsize=units.MiB) as tar:
            for info, content in entries:
                if isinstance(content, Path):
                    with content.open("rb") as f:
                        tar.addfile(info, f)
                elif content is not None:
                    tar.addfile(info, io.BytesIO(content))
                else:
                    tar.addfile(info)
        if compressor is not None:
            compressor.close()
    path = workdir / blob.digest.removeprefix("sha256:")
    tmp.replace(path)
    media_type = _LAYER_TYPES[(media, compression)]
    log.info("LAYER digest=%s size=%d compression=%s", blob.digest, blob.size, compression)
    return Layer(Blob(media_type, blob.digest, blob.size, path=path), diff.digest)


def entry(name: str, *, size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0,
          kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.type = size, mode, uid, gid, kind
    info.mtime, info.linkname = MTIME, linkname
    return info


def disk_entries(disk: Path, name: str | None = None) -> list[Entry]:
    """``disk/`` and ``disk/<name>`` (qemu-owned, read-only), as KubeVirt expects."""
    file_name = name or disk.name
    return [
        (entry("disk", mode=0o555, uid=QEMU_ID, gid=QEMU_ID, kind=tarfile.DIRTYPE), None),
        (entry(f"disk/{file_name}", size=disk.stat().st_size, mode=DISK_MODE, uid=QEMU_ID,
               gid=QEMU_ID), disk),
    ]


def files_entries(files: Mapping[str, bytes]) -> list[Entry]:
    """Regular files (a name ending in ``/`` is a directory) for extra layers."""
    out: list[Entry] = []
    for name, data in files.items():
        if name.endswith("/"):
            out.append((entry(name.rstrip("/"), mode=0o755, kind=tarfile.DIRTYPE), None))
        else:
            out.append((entry(name, size=len(data)), data))
    return out


def image(layers: Sequence[Layer], *, media: str = "oci", architecture: str | None = None,
          os: str = "linux", env: Sequence[str] = (), labels: Mapping[str, str] | None = None,
          ) -> Image:
    """The config and manifest for LAYERS (base first)."""
    manifest_type, config_type, _ = _TYPES[media]
    arch = architecture or oci.machine_architecture()
    body: dict[str, Any] = {}
    if env:
        body["Env"] = list(env)
    if labels:
        body["Labels"] = dict(labels)
    config_doc = {"architecture": arch, "os": os, "config": body,
                  "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in layers]}}
    config = Blob.of(config_type, _canonical(config_doc))
    manifest_doc = {"schemaVersion": 2, "mediaType": manifest_type,
                    "config": config.descriptor().to_json(),
                    "layers": [lay.blob.descriptor().to_json() for lay in layers]}
    manifest = Blob.of(manifest_type, _canonical(manifest_doc))
    return Image(manifest, config, tuple(layers), arch, os)


def index(images: Sequence[Image], *, media: str = "oci") -> Blob:
    """A multi-arch index (OCI) or manifest list (Docker) of IMAGES."""
    doc = {"schemaVersion": 2, "mediaType": _TYPES[media][2],
           "manifests": [i.manifest.descriptor(architecture=i.architecture, os=i.os).to_json()
                         for i in images]}
    return Blob.of(_TYPES[media][2], _canonical(doc))


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- pushing ------------------------------------------------------------------------


class _Chunk:
    """SIZE bytes of F from its current position, as a request body with a length."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._left = size
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


class Pusher:
    """Blobs and manifests into one repository, over an authenticated ``oci.Client``."""

    def __init__(self, reference: str, *, username: str | None = None,
                 password: str | None = None, cert_dir: Path | None = None,
                 insecure: bool = False, chunk_size: int | None = None) -> None:
        self.ref = oci.parse_reference(reference)
        self._settings = Settings(source="registry", endpoint=f"docker://{self.ref}",
                                  access_key=username, secret_key=password, cert_dir=cert_dir,
                                  insecure_registry=insecure, insecure_tls=insecure)
        self._session = http.make_session(self._settings)
        self._client = oci.Client(self.ref, settings=self._settings, session=self._session,
                                  insecure=insecure, operation="push")
        self._chunk = chunk_size

    def _request(self, method: str, path: str, what: str, ok: tuple[int, ...],
                 **kwargs: Any) -> requests.Response:
        try:
            r = self._client.request(method, path, **kwargs)
        except requests.RequestException as e:
            raise self._client.error(f"{what}: {http.describe(e)}") from e
        if r.status_code not in ok:
            raise self._client.error(f"{what}: {oci.registry_error(r)}")
        return r

    def _location(self, r: requests.Response, what: str) -> str:
        location = r.headers.get("Location")
        if not location:
            raise self._client.error(f"{what}: the registry gave no upload location")
        return urllib.parse.urljoin(self._client.base + "/", location)

    def blob(self, blob: Blob) -> None:
        repo, what = self.ref.repository, f"uploading blob {blob.digest}"
        head = self._request("HEAD", f"/v2/{repo}/blobs/{blob.digest}", what, (200, 404))
        if head.status_code == 200:
            log.info("BLOB digest=%s exists", blob.digest)
            return
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", what, (202,))
        location = self._location(r, what)
        headers = {"Content-Type": "application/octet-stream"}
        with blob.open() as f:
            if self._chunk is None:
                body: Any = _Chunk(f, blob.size)
            else:
                start = 0
                while start < blob.size:
                    n = min(self._chunk, blob.size - start)
                    h = dict(headers, **{"Content-Range": f"{start}-{start + n - 1}"})
                    r = self._request("PATCH", location, what, (202,), headers=h,
                                      data=_Chunk(f, n))
                    location = self._location(r, what)
                    start += n
                body = b""
            self._request("PUT", _with_query(location, digest=blob.digest), what, (201,),
                          headers=headers, data=body)
        log.info("BLOB digest=%s size=%d pushed", blob.digest, blob.size)

    def manifest(self, blob: Blob, reference: str) -> None:
        self._request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}",
                      f"uploading manifest {reference}", (201,),
                      headers={"Content-Type": blob.media_type}, data=blob.data)
        log.info("MANIFEST %s/%s:%s digest=%s", self.ref.registry, self.ref.repository,
                 reference, blob.digest)

    def push(self, images: Sequence[Image], *, media: str = "oci",
             as_index: bool = False) -> str:
        """Push IMAGES (one, or several as an index) to the reference; returns its digest."""
        for img in images:
            for b in img.blobs():
                self.blob(b)
        top = images[0].manifest
        if as_index or len(images) > 1:
            for img in images:
                self.manifest(img.manifest, img.manifest.digest)
            top = index(images, media=media)
        self.manifest(top, self.ref.digest or self.ref.tag or "latest")
        return top.digest

    def close(self) -> None:
        self._session.close()


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


# -- oci-archive --------------------------------------------------------------------


def write_oci_archive(images: Sequence[Image], path: Path, *, name: str = "latest",
                      media: str = "oci", as_index: bool = False) -> Path:
    """PATH: a tar of an OCI image layout holding IMAGES, index.json naming it NAME."""
    top = images[0].manifest
    blobs = [b for img in images for b in [*img.blobs(), img.manifest]]
    if as_index or len(images) > 1:
        top = index(images, media=media)
        blobs.append(top)
    root = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        dict(top.descriptor().to_json(), annotations={oci.REF_NAME: name})]}
    seen: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _canonical({"imageLayoutVersion": "1.0.0"}))
        _add_bytes(tar, "index.json", _canonical(root))
        for b in blobs:
            if b.digest in seen:
                continue
            seen.add(b.digest)
            info = entry("blobs/" + b.digest.replace(":", "/"), size=b.size)
            with b.open() as f:
                tar.addfile(info, f)
    return path


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(entry(name, size=len(data)), io.BytesIO(data))


# -- what the CLI calls -------------------------------------------------------------


def publish(disks: Path | Mapping[str, Path], destination: str, *, compression: str = "gzip",
            media: str = "oci", env: Sequence[str] = (),
            labels: Mapping[str, str] | None = None, name: str | None = None,
            username: str | None = None, password: str | None = None,
            cert_dir: Path | None = None, insecure: bool = False,
            chunk_size: int | None = None) -> str:
    """Pack DISKS (a file for this machine's architecture, or {architecture: file} for a
    multi-arch index) as a containerdisk and push it to DESTINATION
    (``[docker://]host[:port]/repo[:tag]``) or write ``oci-archive:<path>[:<name>]``.
    Returns the digest of the manifest (or index) that the reference now names."""
    by_arch = {oci.machine_architecture(): disks} if isinstance(disks, Path) else dict(disks)
    with tempfile.TemporaryDirectory(prefix="containerdisk-") as tmp:
        images = [
            image([layer(Path(tmp), disk_entries(disk, name), compression=compression,
                         media=media)], media=media, architecture=arch, env=env, labels=labels)
            for arch, disk in by_arch.items()
        ]
        as_index = not isinstance(disks, Path)
        if destination.startswith("oci-archive:"):
            spec = destination.removeprefix("oci-archive:")
            path, _, ref_name = spec.partition(":")
            write_oci_archive(images, Path(path), name=ref_name or "latest", media=media,
                              as_index=as_index)
            return (index(images, media=media) if as_index else images[0].manifest).digest
        pusher = Pusher(destination, username=username, password=password, cert_dir=cert_dir,
                        insecure=insecure, chunk_size=chunk_size)
        try:
            return pusher.push(images, media=media, as_index=as_index)
        finally:
            pusher.close()
