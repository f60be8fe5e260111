"""``cdi serve``: the embedded control plane in one process.

It wires the pieces DESIGN.md describes: the SQLite object store, the local
provisioner and the pod runner (the parts Kubernetes plays on a cluster), the
controllers, and the REST API, listening on loopback with a bearer token kept
in the data dir (mode 0600).  State is durable at every acknowledged write, so
after ``kill -9`` a restart carries on: unfinished DataVolumes continue, and
workers left behind are stopped before their pods run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ipaddress
import logging
import os
import secrets
import signal
import ssl
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from cdi.api import certconfig, tokens, validation
from cdi.api import errors as api_errors
from cdi.apiserver import auth, rbac, review
from cdi.apiserver.app import create_app
from cdi.backends.embedded import DatabaseDamaged, DatabaseInUse, certs, storage
from cdi.backends.embedded.podrunner import PodRunner
from cdi.backends.embedded.snapshots import SnapshotController
from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.embedded.uploads import EmbeddedResolver
from cdi.cli import config
from cdi.controllers.clone.controller import CloneController
from cdi.controllers.dataimportcron import DataImportCronController
from cdi.controllers.datasource import DataSourceController
from cdi.controllers.datavolume import DataVolumeController, UploadTLS
from cdi.controllers.runtime import Runtime, run_guarded
from cdi.controllers.storageprofile import CDIConfigController, StorageProfileController
from cdi.controllers.uploadclaim import UploadClaimController
from uploadproxy.app import create_app as create_upload_proxy

log = logging.getLogger("cdi.serve")


def default_data_dir() -> Path:
    env = os.environ.get("CDI_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cdi"


def api_token(data_dir: Path) -> tuple[str, Path]:
    """The API's bearer token, made on first start, readable by the owner only."""
    path = data_dir / "api-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path


async def serve(data_dir: Path, host: str, port: int, *, tls: ssl.SSLContext | None,
                restart_backoff: float, max_workers: int | None,
                upload_proxy_port: int = 0, reflink_root: Path | None = None,
                upload_deadline: datetime.timedelta | None = None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    token, token_file = api_token(data_dir)
    store = SQLiteStore(data_dir / "state.db")
    await store.open()
    await rbac.ensure_defaults(store)
    volumes = storage.Volumes(data_dir, reflink_root)
    await storage.ensure_classes(store, storage.load_classes(data_dir, volumes))
    # The upload proxy: HTTPS with our own CA, tokens signed with our own key.
    key_file = data_dir / "upload-token.key"
    tokens.generate_key(key_file)
    token_key = tokens.load_key(key_file)
    upload_pki = certs.upload_pki(data_dir)
    proxy_tls = upload_pki.proxy_server_context()
    proxy_runner = web.AppRunner(create_upload_proxy(
        public_key=token_key.public_key(), resolver=EmbeddedResolver(store),
        client_ssl=upload_pki.proxy_client_context()), access_log=None)
    await proxy_runner.setup()
    proxy_site = web.TCPSite(proxy_runner, host, upload_proxy_port, ssl_context=proxy_tls)
    await proxy_site.start()
    proxy_url = f"https://{host if ':' not in host else f'[{host}]'}:" \
                f"{proxy_runner.addresses[0][1]}"

    cdiconfig = CDIConfigController(store, upload_proxy_url=proxy_url,
                                    upload_proxy_ca=upload_pki.proxy_ca.read_text())
    await cdiconfig.ensure()
    runner = PodRunner(store, data_dir=data_dir, volumes=volumes, backoff_base=restart_backoff,
                       max_running=max_workers)
    provisioner = storage.Provisioner(store, volumes)
    # No DEADLINE unless asked: our upload servers' certificates outlast any wait
    # (pki.CERT_DAYS) and the proxy reaches them over a local socket (docs/upload-protocol.md).
    upload_tls = UploadTLS(signer=upload_pki.server_signer,
                           client_signer=upload_pki.client_signer, deadline_after=upload_deadline)
    datavolumes = DataVolumeController(store, upload_tls=upload_tls)
    runtime = Runtime(store)
    clones = CloneController(store, upload_tls=upload_tls,
                             client_signer=upload_pki.client_signer)
    for controller in (datavolumes, clones, UploadClaimController(store, upload_tls=upload_tls),
                       StorageProfileController(store), cdiconfig,
                       DataSourceController(store), DataImportCronController(
                               store, authorize_clone=functools.partial(
                                   review.clone_allowed, review.LivePolicyReviewer(store)))):
        runtime.add(controller)

    async def upload_token(obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"].get("namespace", "default")
        pvc = (obj.get("spec") or {}).get("pvcName") or ""
        if not pvc:
            raise api_errors.Invalid("spec.pvcName: Required value")
        answer = dict(obj)
        answer["status"] = {"token": tokens.issue(token_key, namespace=ns, name=pvc)}
        return answer

    app = create_app(store, token=token, admit=validation.validate, pod_logs=runner.log_path,
                     tokens=auth.TokenRegistry(data_dir / "api-tokens.json"),
                     creators={"UploadTokenRequest": upload_token})
    web_runner = web.AppRunner(app, access_log=None)
    await web_runner.setup()
    site = web.TCPSite(web_runner, host, port, ssl_context=tls)
    await site.start()
    bound_port = web_runner.addresses[0][1]
    scheme = "https" if tls else "http"
    url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{bound_port}"
    config.write_server_info(data_dir, url, token_file)
    log.info("SERVING url=%s data_dir=%s", url, data_dir)
    click.echo(f"cdi serve: listening on {url}, data in {data_dir}", err=True)

    tasks = [asyncio.create_task(run_guarded("provisioner", provisioner.run())),
             asyncio.create_task(run_guarded("snapshots",
                                             SnapshotController(store, volumes).run())),
             asyncio.create_task(run_guarded("podrunner", runner.run()))]
    await runtime.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("STOPPING")
        await runtime.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await datavolumes.close()
        await clones.close()
        await web_runner.cleanup()
        await proxy_runner.cleanup()
        await store.close()


def _tls(host: str, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    loopback = host == "localhost" or _is_loopback(host)
    if cert is None and key is None:
        if not loopback:
            raise click.UsageError(
                f"listening on {host} (beyond loopback) needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


@click.command("serve")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="State, volumes and logs (default: $CDI_DATA_DIR or ~/.local/share/cdi).")
@click.option("--address", default="127.0.0.1:8443", show_default=True,
              help="host:port of the REST API (port 0 picks a free one).")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--restart-backoff", type=float, default=10.0, show_default=True,
              help="Seconds before a failed worker's first restart (doubles, max 300).")
@click.option("--upload-proxy-port", type=int, default=0, show_default=True,
              help="Port of the upload proxy (HTTPS, same host as --address; 0 picks one).")
@click.option("--max-workers", type=int, default=None,
              help="Workers running at once (default: twice the CPUs, at least 4).")
@click.option("--reflink-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where local-reflink volumes and snapshots live (default: <data-dir>/reflink);"
                   " the class exists only if this filesystem shares extents (XFS, btrfs).")
@click.option("--upload-deadline", default=None, metavar="DURATION",
              help="Replace an upload server still waiting for its upload after this long"
                   " (Go duration, e.g. 12h; CDI's DEADLINE) with a new one. Default: none.")
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def serve_command(data_dir: Path | None, address: str, tls_cert: Path | None,
                  tls_key: Path | None, restart_backoff: float, upload_proxy_port: int,
                  max_workers: int | None, reflink_root: Path | None,
                  upload_deadline: str | None, verbose: bool) -> None:
    """Run the embedded control plane: REST API, controllers, volumes and workers."""
    deadline = None
    if upload_deadline is not None:
        try:
            deadline = certconfig.parse_duration(upload_deadline, setting="--upload-deadline")
        except certconfig.CertConfigError as e:
            raise click.BadParameter(str(e), param_hint="--upload-deadline") from e
        if deadline <= datetime.timedelta(0):
            raise click.BadParameter(f'"{upload_deadline}" must be longer than 0s',
                                     param_hint="--upload-deadline")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    tls = _tls(host, tls_cert, tls_key)
    try:
        asyncio.run(serve(data_dir or default_data_dir(), host, int(port or 0), tls=tls,
                          restart_backoff=restart_backoff, max_workers=max_workers,
                          upload_proxy_port=upload_proxy_port, reflink_root=reflink_root,
                          upload_deadline=deadline))
    except (DatabaseDamaged, DatabaseInUse) as e:
        raise click.ClickException(str(e)) from e
