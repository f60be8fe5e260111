"""``cdi image-upload``: virtctl's image-upload flow against our upload proxy.

Create (or find) the DataVolume or PVC, wait until its upload server is ready,
get a short-lived token (``UploadTokenRequest``), probe ``upload-async`` with
HEAD, stream the file to the proxy, and wait until the DataVolume has
processed it.  Progress goes to stderr as bytes, rate and ETA.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import requests

from cdi.api.kinds import BY_KIND
from cdi.cli.client import Client, StatusError
from cdi.cli.options import CommandError, api_command
from importer import units

CHUNK = 1 << 20
POLL = 0.5


def _datavolume(name: str, namespace: str, size: str, *, storage_class: str | None,
                access_mode: str | None, volume_mode: str | None,
                archive: bool) -> dict[str, Any]:
    storage: dict[str, Any] = {"resources": {"requests": {"storage": size}}}
    if storage_class:
        storage["storageClassName"] = storage_class
    if access_mode:
        storage["accessModes"] = [access_mode]
    if volume_mode:
        storage["volumeMode"] = volume_mode.capitalize()
    spec: dict[str, Any] = {"source": {"upload": {}}, "storage": storage}
    if archive:
        spec["contentType"] = "archive"
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _wait_phase(client: Client, name: str, namespace: str, wanted: tuple[str, ...],
                timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        dv = client.get(BY_KIND["DataVolume"], name, namespace)
        phase = dv.get("status", {}).get("phase", "")
        if phase in wanted:
            return dv
        if phase == "Failed":
            running = {c["type"]: c for c in dv["status"].get("conditions", [])}.get("Running", {})
            raise CommandError(f"error: upload failed: {running.get('message', '')}")
        if time.monotonic() > deadline:
            raise CommandError(f"error: timed out waiting for DataVolume {namespace}/{name} to "
                               f"be {' or '.join(wanted)} (it is {phase or 'Pending'})")
        time.sleep(POLL)


class _Body:
    """The file as an iterable of chunks with a length (so requests sends a
    Content-Length, not chunked encoding), printing progress as it goes."""

    def __init__(self, path: Path, total: int, start: int = 0) -> None:
        self._path = path
        self._total = total
        self._start = start

    def __len__(self) -> int:
        return self._total - self._start

    def __iter__(self) -> Iterator[bytes]:
        sent = self._start
        started = time.monotonic()
        last = 0.0
        with self._path.open("rb") as f:
            f.seek(self._start)
            while chunk := f.read(CHUNK):
                sent += len(chunk)
                now = time.monotonic()
                if now - last >= 1 or sent == self._total:
                    last = now
                    rate = (sent - self._start) / max(now - started, 1e-6)
                    eta = (self._total - sent) / rate if rate else 0
                    click.echo(f"  {units.humanize(sent)} / {units.humanize(self._total)}  "
                               f"{units.humanize(rate)}/s  ETA {eta:.0f}s", err=True)
                yield chunk


def _token(client: Client, name: str, namespace: str) -> str:
    """A fresh upload token (they live 5 minutes; a resumed upload may need another)."""
    utr = client.create(BY_KIND["UploadTokenRequest"], {
        "apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest",
        "metadata": {"name": name, "namespace": namespace}, "spec": {"pvcName": name}})
    return str(utr["status"]["token"])


def _send(session: requests.Session, client: Client, url: str, endpoint: str, path: Path,
          total: int, *, name: str, namespace: str, checksum: str | None, retries: int,
          wait: float) -> None:
    """POST the file; after a dropped connection or a 5xx, continue where the server is."""
    offset = 0
    for attempt in range(retries + 1):
        headers = {"Authorization": f"Bearer {_token(client, name, namespace)}",
                   "Content-Type": "application/octet-stream"}
        if checksum:
            headers["X-Checksum"] = checksum
        params = {"offset": str(offset)} if offset else None
        try:
            r = session.post(f"{url}/v1beta1/{endpoint}", params=params, headers=headers,
                             data=_Body(path, total, offset), timeout=(30, None),
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
@click.option("--size", default=None, help="Size of the DataVolume (default: the file's size).")
@click.option("--no-create", is_flag=True, help="Upload into an existing DataVolume.")
@click.option("--storage-class", default=None)
@click.option("--access-mode", default=None)
@click.option("--volume-mode", type=click.Choice(["block", "filesystem"]), default=None)
@click.option("--uploadproxy-url", default=None, help="Default: CDIConfig status.uploadProxyURL.")
@click.option("--insecure", is_flag=True, help="Do not verify the upload proxy's certificate.")
@click.option("--wait-secs", type=int, default=300, show_default=True)
@click.option("--checksum", default=None, help="<md5|sha1|sha256|sha512>:<hex> of the file.")
@click.option("--retry", type=int, default=5, show_default=True,
              help="Attempts to continue after a dropped connection or a server error.")
@api_command
def image_upload(client: Client, kind: str, name: str, namespace: str, image_path: Path | None,
                 archive_path: Path | None, size: str | None, no_create: bool,
                 storage_class: str | None, access_mode: str | None, volume_mode: str | None,
                 uploadproxy_url: str | None, insecure: bool, wait_secs: int,
                 checksum: str | None, retry: int) -> None:
    """Upload a disk image (or an archive) into a DataVolume through the upload proxy."""
    if kind == "pvc":
        raise CommandError("error: pvc mode is not supported yet; use dv")
    path = image_path or archive_path
    if path is None or (image_path and archive_path):
        raise CommandError("error: give exactly one of --image-path and --archive-path")
    total = path.stat().st_size
    if not no_create:
        dv = _datavolume(name, namespace, size or str(units.round_up(total, units.MiB)),
                         storage_class=storage_class, access_mode=access_mode,
                         volume_mode=volume_mode, archive=archive_path is not None)
        try:
            client.create(BY_KIND["DataVolume"], dv)
        except StatusError as e:
            if e.code == 409:
                raise CommandError(f"error: DataVolume {namespace}/{name} already exists "
                                   "(use --no-create to upload into it)") from e
            raise
        click.echo(f"DataVolume {namespace}/{name} created", err=True)
    _wait_phase(client, name, namespace, ("UploadReady",), wait_secs)
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
            click.echo(f"Uploading {path} ({units.humanize(total)}) to {url}", err=True)
            _send(session, client, url, endpoint, path, total, name=name, namespace=namespace,
                  checksum=checksum, retries=retry, wait=wait_secs)
    finally:
        if ca_file:
            Path(ca_file).unlink(missing_ok=True)
    click.echo("Upload sent; waiting for the DataVolume to process it", err=True)
    _wait_phase(client, name, namespace, ("Succeeded",), wait_secs)
    click.echo(f"DataVolume {namespace}/{name} Succeeded")
