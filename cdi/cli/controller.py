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
from the same CAs; ``cdi/cli/certrotation.py`` keeps them, their CA bundles and
the proxy's certificates within the lifetimes of ``--ca-duration`` and friends
(the chart's ``certificates.ca`` and ``certificates.server``).  ``/healthz``,
``/readyz`` and ``/metrics`` answer over HTTPS on ``--health-address``.  Worker
Pods get the images named by ``IMPORTER_IMAGE``, ``UPLOADSERVER_IMAGE`` and
``CLONER_IMAGE`` (the chart sets them).  Clones across
namespaces wait for a valid clone token, checked with the apiserver's public key
in ``APISERVER_PUBLIC_KEY`` (the chart sets it from the Secret ``cdi-api-signing-key``;
the command does not start without it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import socket
import ssl
import tempfile
import uuid
from pathlib import Path

import click
import prometheus_client
from aiohttp import web

from cdi.api import certconfig, pki, tokens
from cdi.apiserver import review
from cdi.backends import kube_config
from cdi.backends.kube import KubeStore
from cdi.backends.kube_lease import LeaderElector, LostLeadership
from cdi.cli import certrotation
from cdi.cli.certrotation import CLIENT_CERT as CLIENT_CERT
from cdi.cli.certrotation import CLIENT_SIGNER as CLIENT_SIGNER
from cdi.cli.certrotation import PROXY_CERT as PROXY_CERT
from cdi.cli.certrotation import PROXY_SIGNER as PROXY_SIGNER
from cdi.cli.certrotation import SERVER_SIGNER as SERVER_SIGNER
from cdi.cli.certrotation import SERVER_SIGNER_BUNDLE as SERVER_SIGNER_BUNDLE
from cdi.cli.certrotation import publish_upload_pki as publish_upload_pki
from cdi.cli.certrotation import signer as signer
from cdi.controllers.clone.controller import CloneController
from cdi.controllers.dataimportcron import DataImportCronController
from cdi.controllers.datasource import DataSourceController
from cdi.controllers.datavolume import DataVolumeController, UploadTLS
from cdi.controllers.runtime import Runtime
from cdi.controllers.storageprofile import CDIConfigController, StorageProfileController
from cdi.controllers.uploadclaim import UploadClaimController
from cdi.controllers.workers import CLUSTER, Workers

log = logging.getLogger("cdi.controller")

LEASE_NAME = "cdi-controller-leader-election-helper"


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
    # The worker Pods' images and pull policy; a cluster mounts images as volumes (node pull).
    workers: Workers = CLUSTER
    # PEM of the apiserver's token key (public half): clone tokens are checked with it.
    # Empty checks none (tests); the command refuses to start without one.
    apiserver_public_key: str = ""
    # Lifetimes of the generated CAs and certificates (CDI's spec.certConfig).
    certs: certconfig.CertConfig = dataclasses.field(default_factory=certconfig.CertConfig)


async def run(options: Options, stop: asyncio.Event) -> None:
    """Run the controllers as long as we lead, until ``stop`` is set."""
    config = kube_config.load(options.kubeconfig, options.context)
    namespace = options.namespace or config.namespace
    identity = options.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    health = await _health(options.health_address)
    try:
        async with KubeStore(config) as store:
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
        lifetime = certrotation.ca_lifetime(options.certs)
        server_signer = await signer(store, namespace, SERVER_SIGNER, Path(tmp),
                                     lifetime=lifetime)
        client_signer = await signer(store, namespace, CLIENT_SIGNER, Path(tmp),
                                     lifetime=lifetime)
        # Upload servers wait for their upload until their certificate is due (CDI's
        # DEADLINE: server duration - renewBefore), then are replaced with a new one.
        server = options.certs.server
        upload_tls = UploadTLS(signer=server_signer, client_signer=client_signer,
                               deadline_after=server.duration - server.renew_before)
        published = await certrotation.rotate_upload_pki(
            store, namespace, server_signer, client_signer, Path(tmp), certs=options.certs)
        cdiconfig = CDIConfigController(store, upload_proxy_url=options.upload_proxy_url,
                                        upload_proxy_ca=published.proxy_ca)
        await cdiconfig.ensure()
        datavolumes = DataVolumeController(store, upload_tls=upload_tls, backend="Kubernetes",
                                           workers=options.workers)
        token_key = tokens.load_public_key(options.apiserver_public_key.encode()) \
            if options.apiserver_public_key else None
        clones = CloneController(store, upload_tls=upload_tls, client_signer=client_signer,
                                 service_addresses=True, token_key=token_key,
                                 workers=options.workers)
        runtime = Runtime(store, max_parallel=options.max_parallel)
        for controller in (datavolumes, clones,
                           UploadClaimController(store, upload_tls=upload_tls,
                                                 workers=options.workers),
                           StorageProfileController(store), cdiconfig,
                           DataSourceController(store), DataImportCronController(
                               store, authorize_clone=functools.partial(
                                   review.clone_allowed, review.StoreReviewer(store)))):
            runtime.add(controller)
        await runtime.start()

        def proxy_ca_changed(ca: str) -> None:
            if cdiconfig.set_upload_proxy_ca(ca):
                runtime.enqueue(cdiconfig.name, ("", "config"))

        renewing = asyncio.ensure_future(certrotation.keep_rotating(
            store, namespace, server_signer, client_signer, Path(tmp), certs=options.certs,
            due=published.next_due, on_proxy_ca=proxy_ca_changed))
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
              type=click.Choice(["Always", "IfNotPresent", "Never"]),
              help="imagePullPolicy of worker Pods ($PULL_POLICY).")
@certrotation.lifetime_options
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def controller(backend: str, kubeconfig: Path | None, context: str | None,
               namespace: str | None, identity: str, lease_name: str, upload_proxy_url: str,
               health_address: str, importer_image: str, uploadserver_image: str,
               cloner_image: str, pull_policy: str | None, certs: certconfig.CertConfig,
               verbose: bool) -> None:
    """Run the controllers against a Kubernetes cluster (one leader at a time)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    public_key = os.environ.get("APISERVER_PUBLIC_KEY", "")
    if not public_key:
        raise click.ClickException("APISERVER_PUBLIC_KEY is empty: the controller cannot "
                                   "verify clone tokens (it comes from Secret "
                                   "cdi-api-signing-key)")
    try:
        tokens.load_public_key(public_key.encode())
    except ValueError as e:
        raise click.ClickException(f"APISERVER_PUBLIC_KEY is not an RSA public key: {e}") \
            from e
    options = Options(kubeconfig=kubeconfig, context=context, namespace=namespace,
                      identity=identity, lease_name=lease_name,
                      upload_proxy_url=upload_proxy_url, health_address=health_address,
                      workers=Workers(**{field: image for field, image in (
                          ("importer_image", importer_image),
                          ("uploadserver_image", uploadserver_image),
                          ("cloner_image", cloner_image)) if image},
                          pull_policy=pull_policy or None, image_volumes=True),
                      apiserver_public_key=public_key, certs=certs)
    try:
        asyncio.run(_main(options))
    except kube_config.ConfigError as e:
        raise click.ClickException(str(e)) from e
    except LostLeadership as e:
        log.error("EXIT %s", e)
        raise SystemExit(1) from e
