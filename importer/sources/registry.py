"""Registry source: the disk inside a containerdisk image, streamed out of its layer.

A KubeVirt containerdisk is a container image whose layer holds the disk as
``disk/<file>``.  CDI pulls it with containers/image into scratch space and
converts it; we read the image with the distribution API (``oci``), walk the
layers base to top, read each as a tar stream (gzip, zstd, xz or
uncompressed, found by magic bytes) and stop at the first regular file under
``disk/`` or ``./disk/`` that is not a whiteout, as CDI does: a disk in a later
layer is never read, even if a later layer whites the first one out.  The disk
is never extracted whole first: raw (or compressed raw) goes straight onto the
volume, anything qemu-img must convert goes to ``<scratch>/disk/<name>``.

Every blob is checked against its digest while it streams; a mismatch fails
the import (and removes what was written) when the blob ends.  A dropped
download continues with ``Range`` (a blob never changes under its digest, so
a registry without Range support is simply read past the bytes we have).
``oci-archive:<path>[:<name>]`` reads the same image from an OCI layout tarball.
"""

from __future__ import annotations

import dataclasses
import http.client as http_client
import json
import logging
import re
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import requests
import urllib3

from importer import errors, formats, oci, stream, target, tarstream, units
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings
from importer.sources import http

log = logging.getLogger(__name__)

MAX_CONFIG = 8 * units.MiB
DISK_DIRS = ("disk/", "./disk/")
WHITEOUT = ".wh."
BOOTC_LABELS = ("containers.bootc", "ostree.bootable")
KUBEVIRT_ENV = "KUBEVIRT_IO_"
_READ_ERRORS = (OSError, http_client.HTTPException, urllib3.exceptions.HTTPError,
                requests.RequestException)


class NoDiskFound(errors.ProcessingError):
    msg = "Failed to find VM disk image file in the container image"


class BootcImage(errors.ProcessingError):
    msg = ("bootc image detected: this image contains an ostree-based bootable OS "
           "(containers.bootc=1 or ostree.bootable=1) and cannot be imported as a regular "
           "container disk; bootc-to-disk conversion is not yet implemented")


class ArchitectureMismatch(errors.ProcessingError):
    msg = ("Error validating architecture: manifest image architecture: \"{self.actual}\" "
           "doesn't match requested architecture: \"{self.requested}\"")
    actual: str
    requested: str


def open(settings: Settings, *, progress: Progress) -> RegistrySource:
    return RegistrySource(settings, progress=progress)


def env_to_label(name: str) -> str:
    """CDI's rule: ``A_B_KUBEVIRT_IO_C_D`` -> ``a.b.kubevirt.io/c-d``."""
    before, _, after = name.partition(KUBEVIRT_ENV)
    label = ""
    parts = before.removesuffix("_").split("_")
    if parts[0]:
        label = ".".join(parts) + "."
    return (label + "kubevirt.io/" + "-".join(after.split("_"))).lower()


def labels_from_env(env: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for entry in env:
        name, sep, value = entry.partition("=")
        if sep and KUBEVIRT_ENV in name:
            labels[env_to_label(name)] = value
    return labels


def is_disk_path(name: str) -> bool:
    """Whether a file at NAME (from the image's root) may be the disk (node pull too)."""
    return name.startswith(DISK_DIRS) and not PurePosixPath(name).name.startswith(WHITEOUT)


def _is_disk(member: tarfile.TarInfo) -> bool:
    return member.isreg() and is_disk_path(member.name)


def require_kubevirt(settings: Settings) -> None:
    if settings.content_type != "kubevirt":
        raise errors.SettingsError(variable="IMPORTER_CONTENTTYPE", reason=(
            f"Unsupported content type {settings.content_type} when importing from registry"))


# -- blobs ----------------------------------------------------------------------------


class _Retry(Exception):
    """A blob response worth asking again for (5xx, 429, a wrong Content-Range)."""


class RemoteBlob:
    """GET /v2/<repo>/blobs/<digest>, read with readinto, continued with Range after a drop."""

    def __init__(self, client: oci.Client, desc: oci.Descriptor, *, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self.desc = desc
        self._path = f"/v2/{client.ref.repository}/blobs/{desc.digest}"
        self.offset = 0
        self.failures = 0  # consecutive
        self._skip = 0  # bytes of a 200 answer to a Range request that we already have
        self._response: requests.Response | None = None
        self._fp: Any = None

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        r = self._client.request("GET", self._path, headers=headers, stream=True)
        if r.status_code == 206 and self.offset:
            m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self.offset:
                r.close()
                raise _Retry(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
            self._skip = 0
        elif r.status_code == 200:
            self._skip = self.offset
        else:
            reason, status = oci.registry_error(r), r.status_code
            r.close()
            if status >= 500 or status == 429:
                raise _Retry(reason)
            raise self._client.error(f"fetching blob {self.desc.digest}: {reason}")
        fp = getattr(r.raw, "_fp", None)  # http.client's response: reads into our buffer
        self._response, self._fp = r, fp if hasattr(fp, "readinto") else r.raw

    def readinto(self, buf: memoryview) -> int:
        while True:
            if self._fp is None:
                try:
                    self._open()
                except (requests.RequestException, _Retry) as e:
                    self._failed(e)
                    continue
            try:
                n = int(self._fp.readinto(buf))
            except _READ_ERRORS as e:
                self._failed(e)
                continue
            if n == 0:
                if self.offset < self.desc.size:
                    self._failed(EOFError("the registry closed the connection before the end"))
                    continue
                return 0
            if self._skip:
                k = min(n, self._skip)
                self._skip -= k
                if k == n:
                    continue
                buf[: n - k] = bytes(buf[k:n])
                n -= k
            self.offset += n
            self.failures = 0
            return n

    def _failed(self, cause: BaseException) -> None:
        self.close()
        self.failures += 1
        reason = str(cause) if isinstance(cause, _Retry | EOFError) else http.describe(cause)
        if self.failures > self._settings.retries:
            raise self._client.error(
                f"reading blob {self.desc.digest}: {reason} (gave up after {self.failures} "
                f"attempts at byte {self.offset})") from cause
        delay = min(self._settings.retry_backoff * 2 ** (self.failures - 1), 30.0)
        log.warning("RESUME blob=%s offset=%d attempt=%d delay=%.1f reason=%s",
                    self.desc.digest, self.offset, self.failures, delay, reason)
        time.sleep(delay)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._fp = None, None


class _FileReader:
    """readinto over a file object tarfile hands out (typeshed's IO has no readinto)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def readinto(self, buf: memoryview) -> int:
        return int(self._f.readinto(buf))

    def close(self) -> None:
        self._f.close()


# -- where the image comes from -------------------------------------------------------


class Store(Protocol):
    name: str

    def root(self) -> tuple[bytes, str]:
        """The document the reference names (manifest or index) and its media type."""
        ...

    def manifest(self, desc: oci.Descriptor) -> bytes:
        """A manifest named by digest, checked against it."""
        ...

    def blob(self, desc: oci.Descriptor) -> formats.Reader: ...

    def close(self) -> None: ...


class RemoteStore:
    def __init__(self, ref: oci.Reference, settings: Settings) -> None:
        insecure = settings.insecure_registry or settings.insecure_tls
        if settings.basic_auth is None and settings.docker_config is not None:
            # A .dockerconfigjson pull secret: the entry for this registry, if any.
            found = oci.credentials_from_dockerconfig(settings.docker_config.read_text(),
                                                      ref.registry)
            if found is not None:
                settings = dataclasses.replace(settings, access_key=found[0],
                                               secret_key=found[1])
        self._settings = settings
        self._session = http.make_session(
            dataclasses.replace(settings, extra_headers=(), insecure_tls=insecure))
        self._client = oci.Client(ref, settings=settings, session=self._session,
                                  insecure=insecure)
        self.ref, self.name = ref, str(ref)

    def root(self) -> tuple[bytes, str]:
        content, content_type = self._client.get_manifest(self.ref.reference)
        if self.ref.digest:
            oci.check_digest(content, self.ref.digest, f"manifest {self.ref.digest}")
        return content, content_type

    def manifest(self, desc: oci.Descriptor) -> bytes:
        content, _ = self._client.get_manifest(desc.digest)
        oci.check_digest(content, desc.digest, f"manifest {desc.digest}")
        return content

    def blob(self, desc: oci.Descriptor) -> formats.Reader:
        return RemoteBlob(self._client, desc, settings=self._settings)

    def close(self) -> None:
        self._session.close()


class ArchiveStore:
    """An ``oci-archive``: a tar of an OCI image layout (oci-layout, index.json, blobs/)."""

    def __init__(self, spec: str) -> None:
        path, ref_name = spec, None
        if not Path(path).is_file() and ":" in spec:
            path, _, ref_name = spec.rpartition(":")
        self.name = f"oci-archive:{spec}"
        self._ref_name = ref_name
        try:
            self._tar = tarfile.open(path, "r:*")  # closed in close()
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()
                             if m.isreg()}
        except (OSError, tarfile.TarError) as e:
            raise oci.pull_error(f"reading {self.name}: {e}") from e

    def _read(self, name: str, limit: int) -> bytes:
        member = self._members.get(name)
        if member is None or member.size > limit:
            why = "missing" if member is None else f"larger than {limit} bytes"
            raise oci.pull_error(f"{self.name}: {name} {why}")
        f = self._tar.extractfile(member)
        assert f is not None
        with f:
            return f.read()

    def root(self) -> tuple[bytes, str]:
        content = self._read("index.json", oci.MAX_MANIFEST)
        index = oci.parse_document(content, oci.OCI_INDEX)
        if not isinstance(index, oci.Index):
            raise oci.pull_error(f"{self.name}: bad index.json")
        entries = index.manifests
        if self._ref_name is not None:
            entries = [d for d in entries if d.annotations.get(oci.REF_NAME) == self._ref_name]
            if not entries:
                raise oci.pull_error(
                    f"{self.name}: no image named {self._ref_name!r} in index.json")
        if len(entries) == 1:
            return self.manifest(entries[0]), entries[0].media_type
        return content, oci.OCI_INDEX

    def manifest(self, desc: oci.Descriptor) -> bytes:
        content = self._read(_blob_name(desc), oci.MAX_MANIFEST)
        oci.check_digest(content, desc.digest, f"manifest {desc.digest}")
        return content

    def blob(self, desc: oci.Descriptor) -> formats.Reader:
        member = self._members.get(_blob_name(desc))
        if member is None:
            raise oci.pull_error(f"{self.name}: blob {desc.digest} missing")
        return _FileReader(self._tar.extractfile(member))

    def close(self) -> None:
        self._tar.close()


def _blob_name(desc: oci.Descriptor) -> str:
    algorithm, _, hexdigest = desc.digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def read_config(store: Store, desc: oci.Descriptor) -> dict[str, Any]:
    if desc.size > MAX_CONFIG:
        raise oci.pull_error(f"image config of {desc.size} bytes")
    buf, n = bytearray(desc.size + 1), 0
    blob = oci.Verifying(store.blob(desc), desc)
    with memoryview(buf) as view:
        while m := blob.readinto(view[n:]):
            n += m
    blob.close()
    try:
        config = json.loads(bytes(buf[:n]))
    except ValueError as e:
        raise oci.pull_error(f"invalid image config: {e}") from e
    if not isinstance(config, dict):
        raise oci.pull_error("invalid image config")
    return config


# -- the source -----------------------------------------------------------------------


@dataclasses.dataclass
class _Disk:
    layer: int
    name: str  # member name in the layer
    size: int
    blob: oci.Verifying
    tar: tarstream.TarStream
    detected: formats.Detected


class RegistrySource:
    kind = "registry"

    def __init__(self, settings: Settings, *, progress: Progress) -> None:
        require_kubevirt(settings)
        self._settings = settings
        self._progress = progress
        self._buf = bytearray(units.MiB)  # for draining blobs
        self._labels: dict[str, str] = {}
        self._disk: _Disk | None = None
        self._scratch_image: Path | None = None
        endpoint = settings.endpoint
        self._store: Store
        if endpoint.startswith("oci-archive:"):
            self._store = ArchiveStore(endpoint.removeprefix("oci-archive:"))
        else:
            self._store = RemoteStore(oci.parse_reference(endpoint), settings)

    def info(self) -> Phase:
        manifest = self._resolve()
        self._disk = self._find_disk(manifest)
        d = self._disk
        log.info("DISK image=%s layer=%d name=%s size=%d format=%s", self._store.name, d.layer,
                 d.name, d.size, "/".join(d.detected.layers))
        return Phase.TRANSFER_SCRATCH if d.detected.needs_conversion else Phase.TRANSFER_DATA_FILE

    def _resolve(self) -> oci.Manifest:
        content, media_type = self._store.root()
        doc = oci.parse_document(content, media_type)
        requested = self._settings.registry_architecture
        if isinstance(doc, oci.Index):
            entry = oci.select_platform(doc, requested or oci.machine_architecture())
            doc = oci.parse_document(self._store.manifest(entry), entry.media_type)
            if isinstance(doc, oci.Index):
                raise oci.pull_error("nested image indexes")
        config = read_config(self._store, doc.config)
        raw = config.get("config")
        body: dict[str, Any] = raw if isinstance(raw, dict) else {}
        env, labels = body.get("Env"), body.get("Labels")
        if isinstance(labels, dict) and any(labels.get(n) == "1" for n in BOOTC_LABELS):
            raise BootcImage()
        actual = str(config.get("architecture", ""))
        if requested and actual != requested:
            raise ArchitectureMismatch(actual=actual, requested=requested)
        self._labels = labels_from_env([str(e) for e in env] if isinstance(env, list) else [])
        log.info("IMAGE source=%s media=%s layers=%d architecture=%s", self._store.name,
                 doc.media_type, len(doc.layers), actual)
        return doc

    def _find_disk(self, manifest: oci.Manifest) -> _Disk:
        layers = manifest.layers
        self._progress.set_total(sum(d.size for d in layers))
        for i, desc in enumerate(layers):
            blob = oci.Verifying(self._store.blob(desc), desc, self._progress.add_read)
            try:
                found = self._search(i, blob)
            except (errors.CorruptStream, tarfile.TarError) as e:
                self._settle(blob, e)
                log.warning("LAYER %d (%s) skipped, not a readable tar: %s", i, desc.digest, e)
                blob.close()
                continue
            if found is not None:
                self._progress.set_total(sum(d.size for d in layers[: i + 1]))
                return found
            blob.drain(self._buf)
            blob.close()
        raise NoDiskFound()

    @staticmethod
    def _search(index: int, blob: oci.Verifying) -> _Disk | None:
        layer = formats.detect(blob)
        if layer.format != "raw":
            raise errors.CorruptStream(format="tar", reason=f"the layer is {layer.format}")
        # Headers through tarfile, the disk's data straight from the layer (tarstream).
        tar = tarstream.TarStream(layer.reader)
        while (member := tar.next()) is not None:
            if _is_disk(member):
                return _Disk(index, member.name, member.size, blob, tar, formats.detect(tar))
        return None

    def _settle(self, blob: oci.Verifying, cause: BaseException) -> None:
        """A layer failed to decompress or untar: a digest mismatch explains it better."""
        try:
            blob.drain(self._buf)
        except oci.RegistryError as e:
            raise e from cause
        except (errors.CorruptStream, tarfile.TarError):
            pass

    def _copy(self, sink: stream.Sink, total: int | None) -> None:
        disk = self._disk
        assert disk is not None
        try:
            stream.copy(disk.detected.reader, sink, total=total)
        except (errors.CorruptStream, tarfile.TarError) as e:
            self._settle(disk.blob, e)
            if isinstance(e, tarfile.TarError):
                raise errors.CorruptStream(format="tar", reason=str(e)) from e
            raise
        disk.blob.drain(self._buf)  # the layer's digest is checked before we report success

    def transfer_file(self, target_: target.Target) -> Phase:
        disk = self._disk
        assert disk is not None
        total = None if disk.detected.compressed else disk.size
        if total is not None and total > target_.capacity:
            raise errors.ImageTooLarge(virtual=total, available=target_.capacity)
        with target_.open_writer(preallocate=self._settings.preallocation) as w:
            try:
                self._copy(w, total)
                size = w.finish()
            except errors.Error:
                w.close()
                target_.remove()
                raise
        self._progress.set_written(size)
        log.info("WROTE size=%d data=%d", size, w.data_bytes)
        return Phase.RESIZE

    def transfer(self, scratch_dir: Path) -> Phase:
        disk = self._disk
        assert disk is not None
        disk_dir = scratch_dir / "disk"
        if disk_dir.is_dir():
            target.clear_dir(disk_dir)
        name = PurePosixPath(disk.name).name
        path = disk_dir / (name if name not in ("", ".", "..") else "disk.img")
        free = shutil.disk_usage(scratch_dir).free
        with target.Writer.open(path, block=False, capacity=free, preallocate=False,
                                keep_cache=True) as w:
            try:
                self._copy(w, None)
                w.finish()
            except errors.Error:
                path.unlink(missing_ok=True)
                raise
        self._scratch_image = path
        return Phase.CONVERT

    def transfer_dir(self, data_dir: Path) -> Phase:
        raise errors.ProcessingError(reason="a registry image cannot be imported as an archive")

    def url(self) -> str:
        return str(self._scratch_image or "")

    def image_format(self) -> str:
        return self._disk.detected.format if self._disk is not None else "raw"

    def labels(self) -> dict[str, str]:
        """PVC labels from the image's ``*KUBEVIRT_IO_*`` environment (CDI's rule)."""
        return dict(self._labels)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.blob.close()
            self._disk.tar.close()
        self._store.close()
        if self._scratch_image is not None:
            self._scratch_image.unlink(missing_ok=True)
