"""``cdi controller``: the controllers of ``cdi serve``, on a Kubernetes cluster.

The same controllers, wired the same way, against ``KubeStore`` instead of
SQLite; what ``cdi serve`` adds to play the cluster's parts (pod runner,
provisioner, snapshotter, REST API, upload proxy) is left out, because on
Kubernetes the kubelet, the CSI drivers and the snapshot controller do those,
and the API server and the upload proxy run as their own Deployments.

Only the holder of the ``coordination.k8s.io`` Lease reconciles (replicas wait
as followers); it releases the Lease on SIGTERM so a successor starts at once,
and exits non-zero if it loses the Lease, for the Deployment to restart it.
The upload servers' signers live in Secrets of the install namespace (made by
the first controller that needs them), so every replica issues certificates
from the same CAs.  ``/healthz``, ``/readyz`` and ``/metrics`` answer over HTTPS
on ``--health-address``.  Worker Pods get the images named by ``IMPORTER_IMAGE``,
``UPLOADSERVER_IMAGE`` and ``CLONER_IMAGE`` (the chart sets them).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import logging
import os
import signal
import socket
import ssl
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import click
import prometheus_client
from aiohttp import web
from cryptography import x509

from cdi.api import errors, pki
from cdi.apiserver import review
from cdi.backends import kube_config
from cdi.backends.kube import KubeStore
from cdi.backends.kube_lease import LeaderElector, LostLeadership
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.clone.controller import CloneController
from cdi.controllers.dataimportcron import DataImportCronController
from cdi.controllers.datasource import DataSourceController
from cdi.controllers.datavolume import DataVolumeController, UploadTLS
from cdi.controllers.runtime import Runtime
from cdi.controllers.storageprofile import CDIConfigController, StorageProfileController
from cdi.controllers.uploadclaim import UploadClaimController

log = logging.getLogger("cdi.controller")

LEASE_NAME = "cdi-controller-leader-election-helper"
SERVER_SIGNER = "cdi-uploadserver-signer"
CLIENT_SIGNER = "cdi-uploadserver-client-signer"
PROXY_SIGNER = "cdi-uploadproxy-signer"
SERVER_SIGNER_BUNDLE = "cdi-uploadserver-signer-bundle"
CLIENT_CERT = "cdi-uploadserver-client-cert"
PROXY_CERT = "cdi-uploadproxy-server-cert"
PROXY_CERT_DAYS = 90  # the proxy's certificates; renewed when less than RENEW_BEFORE is left
RENEW_BEFORE = datetime.timedelta(days=30)
RENEW_CHECK = 12 * 3600.0  # seconds between looks at the proxy's certificates


@dataclasses.dataclass(frozen=True)
class Options:
    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str | None = None  # where the Lease and the signer Secrets live
    identity: str = ""
    lease_name: str = LEASE_NAME
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    upload_proxy_url: str = ""
    health_address: str = ""  # host:port of HTTPS /healthz, /readyz, /metrics; "" for none
    max_parallel: int = 32
    images: dict[str, str] = dataclasses.field(default_factory=dict)  # command -> image
    pull_policy: str | None = None


async def signer(store: ObjectStore, namespace: str, name: str, workdir: Path) -> pki.Signer:
    """The CA kept in Secret ``name``; made (by whoever comes first) if missing."""
    directory = workdir / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(3):
        try:
            secret = await store.get("Secret", name, namespace)
        except errors.NotFound:
            made = pki.Signer(directory, name)
            key = (directory / "ca.key").read_bytes()
            try:
                await store.create({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app": "containerized-data-importer"}},
                    "data": {"tls.crt": base64.b64encode(made.cert_pem).decode(),
                             "tls.key": base64.b64encode(key).decode()}})
                return made
            except errors.AlreadyExists:
                for f in ("ca.crt", "ca.key"):
                    (directory / f).unlink(missing_ok=True)
                continue  # another replica won: use its CA
        data = secret.get("data") or {}
        pki.write_private(directory / "ca.key", base64.b64decode(data["tls.key"]))
        (directory / "ca.crt").write_bytes(base64.b64decode(data["tls.crt"]))
        return pki.Signer(directory, name)
    raise RuntimeError(f"Secret {namespace}/{name} keeps changing")


async def publish_upload_pki(store: ObjectStore, namespace: str, server_signer: pki.Signer,
                             client_signer: pki.Signer, workdir: Path) -> str:
    """What the upload proxy needs of the upload servers' PKI, made if missing; the CA of
    the proxy's serving certificate ("" when cert-manager makes it).

    The ConfigMap ``cdi-uploadserver-signer-bundle`` (``ca-bundle.crt``: the CA that
    signs upload servers, which the proxy verifies them against); unless cert-manager
    makes them (``CDI_CERTIFICATES=cert-manager``), the proxy's client certificate
    ``cdi-uploadserver-client-cert`` (from the client signer) and its serving
    certificate ``cdi-uploadproxy-server-cert`` (from ``cdi-uploadproxy-signer``).
    """
    labels = {"app": "containerized-data-importer"}
    data = {"ca-bundle.crt": server_signer.cert_pem.decode()}
    try:
        await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": SERVER_SIGNER_BUNDLE, "namespace": namespace,
                                         "labels": labels},
                            "data": data})
    except errors.AlreadyExists:
        current = await store.get("ConfigMap", SERVER_SIGNER_BUNDLE, namespace)
        if current.get("data") != data:
            current["data"] = data
            await store.replace(current)
    if os.environ.get("CDI_CERTIFICATES", "generate") == "cert-manager":
        return ""
    proxy_signer = await signer(store, namespace, PROXY_SIGNER, workdir)
    svc = "cdi-uploadproxy"
    wanted: tuple[tuple[str, Callable[[], pki.Issued]], ...] = (
        (CLIENT_CERT, lambda: client_signer.issue(pki.UPLOAD_CLIENT_NAME, client=True,
                                                  days=PROXY_CERT_DAYS)),
        (PROXY_CERT, lambda: proxy_signer.issue(svc, days=PROXY_CERT_DAYS, hosts=(
            svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc",
            f"{svc}.{namespace}.svc.cluster.local"))),
    )
    for name, issue in wanted:
        secret: Obj | None
        try:
            secret = await store.get("Secret", name, namespace)
        except errors.NotFound:
            secret = None
        if secret is not None and not _expiring(secret):
            continue  # made before (by us, another replica, or cert-manager), still good
        issued = issue()
        data = {"tls.crt": base64.b64encode(issued.cert_pem).decode(),
                "tls.key": base64.b64encode(issued.key_pem).decode(),
                "ca.crt": base64.b64encode(issued.ca_pem).decode()}
        try:
            if secret is None:
                await store.create({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": name, "namespace": namespace, "labels": labels},
                    "data": data})
                log.info("created Secret %s/%s", namespace, name)
            else:
                secret["data"] = data
                await store.replace(secret)
                log.info("renewed Secret %s/%s", namespace, name)
        except (errors.AlreadyExists, errors.Conflict):
            pass  # another replica was quicker
    return proxy_signer.cert_pem.decode()


def _expiring(secret: Obj) -> bool:
    """Whether the certificate in SECRET is unreadable or within RENEW_BEFORE of its end."""
    try:
        cert = x509.load_pem_x509_certificate(
            base64.b64decode((secret.get("data") or {})["tls.crt"]))
    except (KeyError, ValueError):
        return True
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left < RENEW_BEFORE


async def run(options: Options, stop: asyncio.Event) -> None:
    """Run the controllers as long as we lead, until ``stop`` is set."""
    config = kube_config.load(options.kubeconfig, options.context)
    namespace = options.namespace or config.namespace
    identity = options.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    health = await _health(options.health_address)
    try:
        async with KubeStore(config, pod_images=options.images,
                             pull_policy=options.pull_policy) as store:
            elector = LeaderElector(store, name=options.lease_name, namespace=namespace,
                                    identity=identity, lease_duration=options.lease_duration,
                                    renew_deadline=options.renew_deadline,
                                    retry_period=options.retry_period)

            async def lead() -> None:
                log.info("LEADING identity=%s namespace=%s", identity, namespace)
                await _reconcile(store, namespace, options, stop)

            leading = asyncio.ensure_future(elector.run(lead))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({leading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not leading.done() and not elector.is_leader:
                    leading.cancel()  # stopped while a follower: nothing to wind down
                # A leader winds down by itself (stop is set): runtime, then the Lease.
                await leading
            except asyncio.CancelledError:
                if not stop.is_set():
                    raise
            finally:
                stopping.cancel()
    finally:
        if health is not None:
            await health.cleanup()


async def _reconcile(store: KubeStore, namespace: str, options: Options,
                     stop: asyncio.Event) -> None:
    with tempfile.TemporaryDirectory(prefix="cdi-controller-") as tmp:
        server_signer = await signer(store, namespace, SERVER_SIGNER, Path(tmp))
        client_signer = await signer(store, namespace, CLIENT_SIGNER, Path(tmp))
        upload_tls = UploadTLS(signer=server_signer, client_ca_pem=client_signer.cert_pem)
        proxy_ca = await publish_upload_pki(store, namespace, server_signer, client_signer,
                                            Path(tmp))
        cdiconfig = CDIConfigController(store, upload_proxy_url=options.upload_proxy_url,
                                        upload_proxy_ca=proxy_ca)
        await cdiconfig.ensure()
        datavolumes = DataVolumeController(store, upload_tls=upload_tls, backend="Kubernetes")
        clones = CloneController(store, upload_tls=upload_tls, client_signer=client_signer,
                                 service_addresses=True)
        runtime = Runtime(store, max_parallel=options.max_parallel)
        for controller in (datavolumes, clones,
                           UploadClaimController(store, upload_tls=upload_tls),
                           StorageProfileController(store), cdiconfig,
                           DataSourceController(store), DataImportCronController(
                               store, authorize_clone=functools.partial(
                                   review.clone_allowed, review.StoreReviewer(store)))):
            runtime.add(controller)
        await runtime.start()

        async def renew() -> None:
            while True:
                await asyncio.sleep(RENEW_CHECK)
                try:
                    await publish_upload_pki(store, namespace, server_signer, client_signer,
                                             Path(tmp))
                except errors.APIError as e:
                    log.warning("renewing the upload proxy's certificates: %s", e.message)

        renewing = asyncio.ensure_future(renew())
        try:
            await stop.wait()
        finally:
            log.info("STOPPING")
            renewing.cancel()
            await runtime.stop()
            await datavolumes.close()
            await clones.close()


async def _health(address: str) -> web.AppRunner | None:
    """HTTPS with a certificate of our own (probes and scrapers do not verify it)."""
    if not address:
        return None

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(),
                            content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="cdi-controller-tls-") as tmp:
        ca = pki.Signer(Path(tmp) / "ca", "cdi-controller-self-signed")
        cert, key = ca.issue_files(Path(tmp) / "serving", "cdi-deployment",
                                   hosts=(socket.gethostname(),))
        ctx.load_cert_chain(str(cert), str(key))
    host, _, port = address.rpartition(":")
    await web.TCPSite(runner, host.strip("[]") or None, int(port), ssl_context=ctx).start()
    return runner


async def _main(options: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(options, stop)


@click.command("controller")
@click.option("--backend", type=click.Choice(["kube"]), default="kube", show_default=True,
              help="Where objects live (the embedded backend runs in `cdi serve`).")
@click.option("--kubeconfig", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Default: $KUBECONFIG, the Pod's service account, ~/.kube/config.")
@click.option("--context", default=None, help="kubeconfig context (default: current).")
@click.option("--namespace", default=None, envvar="POD_NAMESPACE",
              help="Namespace of the Lease and signer Secrets (default: $POD_NAMESPACE, "
                   "the service account's, or the context's).")
@click.option("--identity", default=lambda: os.environ.get("POD_NAME", ""),
              help="Leader election identity (default: $POD_NAME, else host name + random).")
@click.option("--lease-name", default=LEASE_NAME, show_default=True)
@click.option("--upload-proxy-url", default="",
              help="Published in CDIConfig status.uploadProxyURL.")
@click.option("--health-address", default=":8443", show_default=True,
              help="host:port of HTTPS /healthz, /readyz and /metrics (empty for none).")
@click.option("--importer-image", envvar="IMPORTER_IMAGE", default="",
              help="Image of import worker Pods ($IMPORTER_IMAGE).")
@click.option("--uploadserver-image", envvar="UPLOADSERVER_IMAGE", default="",
              help="Image of upload server Pods ($UPLOADSERVER_IMAGE).")
@click.option("--cloner-image", envvar="CLONER_IMAGE", default="",
              help="Image of clone source Pods ($CLONER_IMAGE).")
@click.option("--pull-policy", envvar="PULL_POLICY", default=None,
              help="imagePullPolicy of worker Pods ($PULL_POLICY).")
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def controller(backend: str, kubeconfig: Path | None, context: str | None,
               namespace: str | None, identity: str, lease_name: str, upload_proxy_url: str,
               health_address: str, importer_image: str, uploadserver_image: str,
               cloner_image: str, pull_policy: str | None, verbose: bool) -> None:
    """Run the controllers against a Kubernetes cluster (one leader at a time)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = Options(kubeconfig=kubeconfig, context=context, namespace=namespace,
                      identity=identity, lease_name=lease_name,
                      upload_proxy_url=upload_proxy_url, health_address=health_address,
                      images={command: image for command, image in (
                          ("cdi-importer", importer_image),
                          ("cdi-uploadserver", uploadserver_image),
                          ("cdi-clone-source", cloner_image)) if image},
                      pull_policy=pull_policy or None)
    try:
        asyncio.run(_main(options))
    except kube_config.ConfigError as e:
        raise click.ClickException(str(e)) from e
    except LostLeadership as e:
        log.error("EXIT %s", e)
        raise SystemExit(1) from e
