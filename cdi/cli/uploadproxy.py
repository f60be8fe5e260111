"""``cdi uploadproxy``: the upload proxy on a cluster, and how it finds upload servers there.

The proxy itself is the ``uploadproxy`` package (tokens, routing, streaming);
what differs on Kubernetes is its ``Resolver`` and where its keys come from,
as the chart deploys it (``cdi/manifests/workloads.py``):

- **Resolver.**  The claim must exist and be an upload target
  (``cdi.kubevirt.io/storage.upload.target``) that has not finished; its
  upload server is the pod ``cdi-upload-<claim>``, reached through the Service
  of the same name (``https://cdi-upload-<claim>.<ns>.svc:8443``, as CDI's) once
  the controller marked the claim ``cdi.kubevirt.io/storage.pod.ready: "true"``
  (the pod is Running and Ready).  Like CDI's proxy it reads only the claim,
  which is all its RBAC allows (seeds table 1.6).  The answers and their texts
  are the embedded resolver's, which are CDI's.
- **Keys.**  Upload tokens are verified with the public key in
  ``$APISERVER_PUBLIC_KEY`` (from the Secret ``cdi-api-signing-key``).  The
  proxy serves with ``--server-cert-dir`` (``tls.crt``, ``tls.key``), presents
  ``--client-cert-dir`` to upload servers (mutual TLS), and verifies them
  against the ConfigMap ``cdi-uploadserver-signer-bundle`` that the
  controller publishes.  Every minute the bundle is re-read and the certificate
  files are looked at, so a renewed CA or certificate is picked up without a
  restart (the controller renews the proxy's certificates and CAs ahead of their
  end: ``certificates.*.renewBefore``, ``cdi/cli/certrotation.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from pathlib import Path

import click
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import errors
from cdi.backends import kube_config
from cdi.backends.kube import KubeStore
from cdi.backends.port import ObjectStore
from cdi.cli.controller import SERVER_SIGNER_BUNDLE
from cdi.controllers.importpod import UPLOAD_PORT
from uploadproxy.app import create_app
from uploadproxy.resolver import NotReadyYet, UploadTarget, check_claim

log = logging.getLogger("cdi.uploadproxy")

UPLOAD_TARGET = "cdi.kubevirt.io/storage.upload.target"
POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"
POD_READY = "cdi.kubevirt.io/storage.pod.ready"
CONTENT_TYPE = "cdi.kubevirt.io/storage.contentType"
BUNDLE_REFRESH = 60.0


class KubeResolver:
    """Upload servers behind their Services."""

    def __init__(self, store: ObjectStore, *, cluster_domain: str = "") -> None:
        self._store = store
        self._suffix = f".{cluster_domain}" if cluster_domain else ""

    async def upload_server(self, namespace: str, pvc: str) -> UploadTarget | None:
        try:
            claim = await self._store.get("PersistentVolumeClaim", pvc, namespace)
        except errors.NotFound:
            claim = None
        annotations = check_claim(pvc, claim)
        if annotations.get(POD_READY) != "true":
            raise NotReadyYet("the upload server is not ready")
        name = f"cdi-upload-{pvc}"
        return UploadTarget(url=f"https://{name}.{namespace}.svc{self._suffix}:{UPLOAD_PORT}",
                            content_type=annotations.get(CONTENT_TYPE) or "kubevirt")


def public_key(pem: str) -> rsa.RSAPublicKey:
    if not pem.strip():
        raise click.ClickException("APISERVER_PUBLIC_KEY is empty: the proxy cannot verify "
                                   "upload tokens (it comes from Secret cdi-api-signing-key)")
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise click.ClickException("APISERVER_PUBLIC_KEY is not an RSA public key")
    return key


async def _bundle(store: ObjectStore, namespace: str) -> str:
    cm = await store.get("ConfigMap", SERVER_SIGNER_BUNDLE, namespace)
    return str((cm.get("data") or {}).get("ca-bundle.crt") or "")


def client_context(bundle: str) -> ssl.SSLContext:
    """Verify upload servers against BUNDLE (host names checked); our certificate is loaded
    into it by ``CertFiles``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class CertFiles:
    """A ``tls.crt``/``tls.key`` pair loaded into a context, reloaded when the files change
    (the kubelet updates a mounted Secret in place when the controller renews it)."""

    def __init__(self, directory: Path, ctx: ssl.SSLContext) -> None:
        self.directory = directory
        self.ctx = ctx
        self._seen = self._stamp()
        ctx.load_cert_chain(str(directory / "tls.crt"), str(directory / "tls.key"))

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        stats = (os.stat(self.directory / f) for f in ("tls.crt", "tls.key"))
        return tuple((st.st_ino, st.st_mtime_ns) for st in stats)

    def reload_if_changed(self) -> bool:
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return False
            self.ctx.load_cert_chain(str(self.directory / "tls.crt"),
                                     str(self.directory / "tls.key"))
        except (OSError, ssl.SSLError) as e:  # half-written: the next look gets it whole
            log.warning("cannot reload %s: %s", self.directory, e)
            return False
        self._seen = stamp
        log.info("certificate reloaded from %s", self.directory)
        return True


async def _refresh(store: ObjectStore, namespace: str, ctx: ssl.SSLContext, known: str,
                   certs: tuple[CertFiles, ...]) -> None:
    """Add a changed CA bundle to CTX (certificates are only ever added to a context), and
    reload renewed certificates."""
    while True:
        await asyncio.sleep(BUNDLE_REFRESH)
        for files in certs:
            files.reload_if_changed()
        try:
            bundle = await _bundle(store, namespace)
        except errors.APIError as e:
            log.warning("cannot read ConfigMap %s: %s", SERVER_SIGNER_BUNDLE, e.message)
            continue
        if bundle and bundle != known:
            ctx.load_verify_locations(cadata=bundle)
            known = bundle
            log.info("upload server CA bundle reloaded")


async def run(*, kubeconfig: Path | None, context: str | None, namespace: str | None,
              address: str, server_dir: Path, client_dir: Path, key_pem: str,
              stop: asyncio.Event) -> None:
    config = kube_config.load(kubeconfig, context)
    ns = namespace or config.namespace
    key = public_key(key_pem)
    async with KubeStore(config) as store:
        bundle = await _bundle(store, ns)
        if not bundle:
            raise click.ClickException(f"ConfigMap {ns}/{SERVER_SIGNER_BUNDLE} has no "
                                       "ca-bundle.crt (the controller publishes it)")
        upstream = client_context(bundle)
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.minimum_version = ssl.TLSVersion.TLSv1_2
        certs = (CertFiles(server_dir, serving), CertFiles(client_dir, upstream))
        app = create_app(public_key=key, resolver=KubeResolver(store), client_ssl=upstream,
                         metrics_endpoint=True)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = address.rpartition(":")
        await web.TCPSite(runner, host.strip("[]") or None, int(port),
                          ssl_context=serving).start()
        log.info("LISTEN address=%s namespace=%s", address, ns)
        refreshing = asyncio.ensure_future(_refresh(store, ns, upstream, bundle, certs))
        try:
            await stop.wait()
        finally:
            refreshing.cancel()
            await runner.cleanup()


@click.command("uploadproxy")
@click.option("--kubeconfig", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Default: $KUBECONFIG, the Pod's service account, ~/.kube/config.")
@click.option("--context", default=None, help="kubeconfig context (default: current).")
@click.option("--namespace", default=None, envvar="POD_NAMESPACE",
              help="Namespace of the CA bundle ConfigMap (default: $POD_NAMESPACE, the "
                   "service account's, or the context's).")
@click.option("--address", default=":8443", show_default=True, help="host:port to serve on.")
@click.option("--server-cert-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/var/run/certs/server"), show_default=True)
@click.option("--client-cert-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/var/run/certs/client"), show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def uploadproxy(kubeconfig: Path | None, context: str | None, namespace: str | None,
                address: str, server_cert_dir: Path, client_cert_dir: Path,
                verbose: bool) -> None:
    """Serve the upload proxy on a Kubernetes cluster."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(kubeconfig=kubeconfig, context=context, namespace=namespace,
                  address=address, server_dir=server_cert_dir, client_dir=client_cert_dir,
                  key_pem=os.environ.get("APISERVER_PUBLIC_KEY", ""), stop=stop)
    try:
        asyncio.run(main())
    except (kube_config.ConfigError, errors.NotFound) as e:
        raise click.ClickException(str(e)) from e
