"""``cdi image-upload``: virtctl's image-upload flow against our upload proxy.

Create (or find) the DataVolume, or in ``pvc`` mode a bare claim annotated as
an upload target, wait until its upload server is ready, get a short-lived
token (``UploadTokenRequest``), probe ``upload-async`` with HEAD, stream the
file to the proxy, wait until the volume has processed it, and optionally point
a DataSource at it.  Progress goes to stderr as bytes, rate and ETA: a bar
redrawn in place on a terminal, a line a second otherwise.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import click
import requests

from cdi.api.kinds import BY_KIND
from cdi.cli.client import Client, StatusError
from cdi.cli.options import CommandError, api_command
from cdi.cli.wait import TimedOut, follow
from importer import formats, units
from importer.upload.sparse import MEDIA_TYPE as SPARSE_TYPE
from importer.upload.sparse import encode as sparse_encode

CHUNK = 1 << 20
POLL = 0.5


FORCE_BIND = "cdi.kubevirt.io/storage.bind.immediate.requested"
UPLOAD_TARGET = "cdi.kubevirt.io/storage.upload.target"
CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
POD_READY = "cdi.kubevirt.io/storage.pod.ready"
RUNNING_MESSAGE = "cdi.kubevirt.io/storage.condition.running.message"


def _storage(size: str, *, storage_class: str | None, access_mode: str | None,
             volume_mode: str | None) -> dict[str, Any]:
    storage: dict[str, Any] = {"resources": {"requests": {"storage": size}}}
    if storage_class:
        storage["storageClassName"] = storage_class
    if access_mode:
        storage["accessModes"] = [access_mode]
    if volume_mode:
        storage["volumeMode"] = volume_mode.capitalize()
    return storage


def _datavolume(name: str, namespace: str, storage: dict[str, Any], *, archive: bool,
                force_bind: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"upload": {}}, "storage": storage}
    if archive:
        spec["contentType"] = "archive"
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if force_bind:
        meta["annotations"] = {FORCE_BIND: "true"}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": meta, "spec": spec}


def _claim(name: str, namespace: str, storage: dict[str, Any], *, archive: bool,
           force_bind: bool) -> dict[str, Any]:
    """A bare upload-target claim (virtctl's pvc mode); the upload controller serves it."""
    annotations = {UPLOAD_TARGET: "", CONTENT_TYPE: "archive" if archive else "kubevirt"}
    if force_bind:
        annotations[FORCE_BIND] = "true"
    spec = {**storage, "accessModes": storage.get("accessModes", ["ReadWriteOnce"])}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": spec}


def _wait_claim(client: Client, name: str, namespace: str, *, done: bool,
                timeout: float) -> None:
    """pvc mode: wait for the upload server (ready) or for the end of processing (done)."""
    phase = ""
    try:
        for pvc in follow(client, BY_KIND["PersistentVolumeClaim"], name, namespace,
                          time.monotonic() + timeout):
            if pvc is None:
                raise CommandError(f"error: PVC {namespace}/{name} was deleted")
            ann = pvc["metadata"].get("annotations", {})
            if UPLOAD_TARGET not in ann:
                raise CommandError(f"error: PVC {namespace}/{name} is not an upload target "
                                   f"(it has no {UPLOAD_TARGET} annotation)")
            phase = ann.get(POD_PHASE, "")
            if phase == "Succeeded":
                if done:
                    return
                raise CommandError(f"error: PVC {namespace}/{name} has already been uploaded to")
            if phase == "Failed":
                raise CommandError(f"error: upload failed: {ann.get(RUNNING_MESSAGE, '')}")
            if not done and phase == "Running" and ann.get(POD_READY) == "true":
                return
    except TimedOut:
        wanted = "processed" if done else "ready for upload"
        raise CommandError(f"error: timed out waiting for PVC {namespace}/{name} to be "
                           f"{wanted} (upload server {phase or 'not started'})") from None


def _wait_phase(client: Client, name: str, namespace: str, wanted: tuple[str, ...],
                timeout: float) -> dict[str, Any]:
    phase = ""
    try:
        for dv in follow(client, BY_KIND["DataVolume"], name, namespace,
                         time.monotonic() + timeout):
            if dv is None:
                raise CommandError(f"error: DataVolume {namespace}/{name} was deleted")
            phase = dv.get("status", {}).get("phase", "")
            if phase in wanted:
                return dv
            if phase == "Failed":
                running = {c["type"]: c for c in dv["status"].get("conditions", [])
                           }.get("Running", {})
                raise CommandError(f"error: upload failed: {running.get('message', '')}")
    except TimedOut:
        pass
    raise CommandError(f"error: timed out waiting for DataVolume {namespace}/{name} to "
                       f"be {' or '.join(wanted)} (it is {phase or 'Pending'})")


class _Progress:
    """Bytes, rate and ETA: one redrawn line on a terminal, a plain line a second otherwise."""

    def __init__(self, total: int, start: int, *, tty: bool) -> None:
        self._total = total
        self._start = start
        self._tty = tty
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, sent: int) -> None:
        now = time.monotonic()
        final = sent >= self._total
        if now - self._last < (0.2 if self._tty else 1.0) and not final:
            return
        self._last = now
        elapsed = now - self._started
        text = f"{units.humanize(sent)} / {units.humanize(self._total)}"
        if elapsed >= 0.5:  # a rate over a few milliseconds says nothing
            rate = (sent - self._start) / elapsed
            eta = (self._total - sent) / rate if rate else 0
            text += f"  {units.humanize(rate)}/s  ETA {eta:.0f}s"
        if not self._tty:
            click.echo(f"  {text}", err=True)
            return
        width = 30
        filled = width * sent // self._total if self._total else width
        percent = 100.0 * sent / self._total if self._total else 100.0
        bar = "#" * filled + "-" * (width - filled)
        click.echo(f"\r[{bar}] {percent:5.1f}%  {text}\x1b[K", err=True, nl=final)


class _Body:
    """The file as an iterable of chunks with a length (so requests sends a
    Content-Length, not chunked encoding), reporting progress as it goes."""

    def __init__(self, path: Path, total: int, start: int = 0) -> None:
        self._path = path
        self._total = total
        self._start = start

    def __len__(self) -> int:
        return self._total - self._start

    def __iter__(self) -> Iterator[bytes]:
        sent = self._start
        progress = _Progress(self._total, self._start, tty=click.get_text_stream("stderr").isatty())
        with self._path.open("rb") as f:
            f.seek(self._start)
            while chunk := f.read(CHUNK):
                sent += len(chunk)
                progress.update(sent)
                yield chunk


class _SparseBody:
    """A raw image as a sparse stream (``importer.upload.sparse``): only its data is sent.

    No length: requests sends it with chunked coding.  Frames start at START
    (a continued upload); the progress shows the position in the image.
    """

    def __init__(self, path: Path, total: int, start: int = 0) -> None:
        self._path = path
        self._total = total
        self._start = start

    def __iter__(self) -> Iterator[memoryview]:
        progress = _Progress(self._total, self._start, tty=click.get_text_stream("stderr").isatty())
        fd = os.open(self._path, os.O_RDONLY)
        try:
            yield from sparse_encode(fd, self._total, start=self._start, reached=progress.update)
        finally:
            os.close(fd)


def _sends_sparse(path: Path, probe: requests.Response) -> bool:
    """Whether to send PATH as a sparse stream: a raw image, to a server that takes one."""
    accepted = {t.strip().lower() for t in probe.headers.get("Accept-Post", "").split(",")}
    if SPARSE_TYPE not in accepted:
        return False  # e.g. a KubeVirt CDI upload server: every byte, as virtctl sends
    with path.open("rb") as f:
        head = f.read(formats.HEADER_SIZE)
    return formats.kind_of(head) == "raw"


def _token(client: Client, name: str, namespace: str) -> str:
    """A fresh upload token (they live 5 minutes; a resumed upload may need another)."""
    utr = client.create(BY_KIND["UploadTokenRequest"], {
        "apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
        "metadata": {"name": name, "namespace": namespace}, "spec": {"pvcName": name}})
    return str(utr["status"]["token"])


def _send(session: requests.Session, client: Client, url: str, endpoint: str, path: Path,
          total: int, *, name: str, namespace: str, checksum: str | None, retries: int,
          wait: float, sparse_stream: bool = False) -> None:
    """POST the file; after a dropped connection or a 5xx, continue where the server is."""
    offset = 0
    for attempt in range(retries + 1):
        headers = {"Authorization": f"Bearer {_token(client, name, namespace)}",
                   "Content-Type": SPARSE_TYPE if sparse_stream
                   else "application/octet-stream"}
        if checksum:
            headers["X-Checksum"] = checksum
        params = {"offset": str(offset)} if offset else None
        body = (_SparseBody(path, total, offset) if sparse_stream
                else _Body(path, total, offset))
        try:
            r = session.post(f"{url}/v1beta1/{endpoint}", params=params, headers=headers,
                             # urllib3 frames memoryviews as it does bytes
                             data=cast("Iterable[bytes]", body), timeout=(30, None),
                             verify=session.verify)
            if r.status_code == 200:
                return
            if r.status_code < 500 and r.status_code != 409:
                raise CommandError(f"error: upload failed ({r.status_code}): {r.text.strip()}")
            reason = f"{r.status_code} {r.text.strip()}"
        except requests.RequestException as e:
            reason = str(e)
        if attempt == retries:
            break
        offset = _resume_offset(session, url, headers["Authorization"], wait)
        if offset < 0:
            return  # the server had it all
        click.echo(f"Upload interrupted ({reason[:200]}); continuing at byte {offset}", err=True)
    raise CommandError(f"error: upload failed after {retries + 1} attempts: {reason}")


def _resume_offset(session: requests.Session, url: str, auth: str, wait: float) -> int:
    """Bytes the upload server holds durably (-1 if complete); waits while it restarts."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            r = session.get(f"{url}/v1beta1/upload-offset", headers={"Authorization": auth},
                            timeout=30, verify=session.verify)
            if r.status_code == 200:
                state = r.json()
                if state.get("complete"):
                    return -1
                if not state.get("inProgress"):
                    return int(state.get("offset", 0))
        except (requests.RequestException, ValueError):
            pass
        time.sleep(POLL)
    return 0


@click.command("image-upload")
@click.argument("kind", type=click.Choice(["dv", "pvc"]))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--image-path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--archive-path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--size", default=None, help="Size of the volume (default: the file's size).")
@click.option("--no-create", is_flag=True, help="Upload into an existing DataVolume or PVC.")
@click.option("--storage-class", default=None)
@click.option("--access-mode", default=None)
@click.option("--volume-mode", type=click.Choice(["block", "filesystem"]), default=None)
@click.option("--force-bind", is_flag=True,
              help="Bind the claim at once, even on a WaitForFirstConsumer storage class.")
@click.option("--datasource", is_flag=True,
              help="Also create a DataSource of the same name pointing at the volume.")
@click.option("--uploadproxy-url", default=None, help="Default: CDIConfig status.uploadProxyURL.")
@click.option("--insecure", is_flag=True, help="Do not verify the upload proxy's certificate.")
@click.option("--wait-secs", type=int, default=300, show_default=True)
@click.option("--checksum", default=None, help="<md5|sha1|sha256|sha512>:<hex> of the file.")
@click.option("--retry", type=int, default=5, show_default=True,
              help="Attempts to continue after a dropped connection or a server error.")
@click.option("--sparse/--no-sparse", default=True, show_default=True,
              help="Send only the data of a raw image (a sparse stream) when the upload "
                   "server takes one; --no-sparse sends every byte, as virtctl does.")
@api_command
def image_upload(client: Client, kind: str, name: str, namespace: str, image_path: Path | None,
                 archive_path: Path | None, size: str | None, no_create: bool,
                 storage_class: str | None, access_mode: str | None, volume_mode: str | None,
                 force_bind: bool, datasource: bool, uploadproxy_url: str | None,
                 insecure: bool, wait_secs: int, checksum: str | None, retry: int,
                 sparse: bool) -> None:
    """Upload a disk image (or an archive) into a DataVolume or a PVC through the upload proxy."""
    path = image_path or archive_path
    if path is None or (image_path and archive_path):
        raise CommandError("error: give exactly one of --image-path and --archive-path")
    total = path.stat().st_size
    what = "DataVolume" if kind == "dv" else "PersistentVolumeClaim"
    label = "DataVolume" if kind == "dv" else "PVC"
    if not no_create:
        storage = _storage(size or str(units.round_up(total, units.MiB)),
                           storage_class=storage_class, access_mode=access_mode,
                           volume_mode=volume_mode)
        build = _datavolume if kind == "dv" else _claim
        obj = build(name, namespace, storage, archive=archive_path is not None,
                    force_bind=force_bind)
        try:
            client.create(BY_KIND[what], obj)
        except StatusError as e:
            if e.code == 409:
                raise CommandError(f"error: {label} {namespace}/{name} already exists "
                                   "(use --no-create to upload into it)") from e
            raise
        click.echo(f"{label} {namespace}/{name} created", err=True)
    else:
        try:
            client.get(BY_KIND[what], name, namespace)
        except StatusError as e:
            if e.code == 404:
                raise CommandError(f"error: {label} {namespace}/{name} does not exist "
                                   "(--no-create uploads into an existing one)") from e
            raise
    if kind == "dv":
        _wait_phase(client, name, namespace, ("UploadReady",), wait_secs)
    else:
        _wait_claim(client, name, namespace, done=False, timeout=wait_secs)
    config = client.get(BY_KIND["CDIConfig"], "config").get("status", {})
    url = (uploadproxy_url or config.get("uploadProxyURL") or "").rstrip("/")
    if not url:
        raise CommandError("error: no upload proxy URL: pass --uploadproxy-url")
    verify: bool | str = not insecure
    ca_file = None
    if not insecure and config.get("uploadProxyCA"):
        fd, ca_file = tempfile.mkstemp(prefix="cdi-uploadproxy-ca-", suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(config["uploadProxyCA"])
        verify = ca_file
    endpoint = "upload-archive-async" if archive_path else "upload-async"
    try:
        with requests.Session() as session:
            # Explicit on every request: requests would let REQUESTS_CA_BUNDLE override it.
            session.verify = verify
            probe = session.head(f"{url}/v1beta1/upload-async", timeout=30, verify=verify, headers={
                "Authorization": f"Bearer {_token(client, name, namespace)}"})
            if probe.status_code != 200:
                raise CommandError(f"error: the upload proxy answered {probe.status_code} to the "
                                   f"probe: {probe.text.strip()}")
            sparse_stream = sparse and image_path is not None and _sends_sparse(image_path, probe)
            how = ", its data only (sparse stream)" if sparse_stream else ""
            click.echo(f"Uploading {path} ({units.humanize(total)}) to {url}{how}", err=True)
            _send(session, client, url, endpoint, path, total, name=name, namespace=namespace,
                  checksum=checksum, retries=retry, wait=wait_secs, sparse_stream=sparse_stream)
    finally:
        if ca_file:
            Path(ca_file).unlink(missing_ok=True)
    click.echo(f"Upload sent; waiting for the {label} to process it", err=True)
    if kind == "dv":
        _wait_phase(client, name, namespace, ("Succeeded",), wait_secs)
    else:
        _wait_claim(client, name, namespace, done=True, timeout=wait_secs)
    if datasource:
        _create_datasource(client, name, namespace)
    click.echo(f"{label} {namespace}/{name} Succeeded")


def _create_datasource(client: Client, name: str, namespace: str) -> None:
    """A DataSource named like the volume, pointing at its claim (virtctl's --datasource)."""
    ds = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
          "metadata": {"name": name, "namespace": namespace},
          "spec": {"source": {"pvc": {"name": name, "namespace": namespace}}}}
    try:
        client.create(BY_KIND["DataSource"], ds)
    except StatusError as e:
        if e.code != 409:
            raise
        client.patch(BY_KIND["DataSource"], name, namespace, {"spec": ds["spec"]})
        click.echo(f"DataSource {namespace}/{name} updated", err=True)
        return
    click.echo(f"DataSource {namespace}/{name} created", err=True)
