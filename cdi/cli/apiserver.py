"""``cdi apiserver``: the aggregated upload API and the admission webhooks, on a cluster.

The request handling is ``cdi.apiserver.kubeapi``; this module sets it up the
way the chart deploys it (``cdi/manifests/workloads.py``):

- **Signing key.**  Upload tokens and clone tokens are signed with an RSA key
  kept in the Secret ``cdi-api-signing-key`` (``id_rsa``, and ``id_rsa.pub``
  for the upload proxy, which verifies); the first replica to start makes it.
- **Serving certificate.**  With ``CDI_CERTIFICATES=cert-manager`` it is read
  from ``--cert-dir`` (``tls.crt``, ``tls.key``; cert-manager's injector fills
  the CA bundles).  With ``generate`` (the default) a CA is kept in the Secret
  ``cdi-apiserver-signer`` and replaced near its end (``--ca-duration``,
  ``--ca-renew-before``; ``cdi/cli/certrotation.py``), its bundle (the current
  CA and the older ones until they expire) is written into the APIService and
  the webhook configurations' ``caBundle`` so kube-apiserver trusts us across a
  rotation, and a serving certificate for the ``cdi-api`` Service is issued from
  the newest CA for ``--server-duration`` and again ``--server-renew-before``
  its end (new connections get the new one).
- **Front proxy.**  Who may vouch for requesters comes from the ConfigMap
  ``kube-system/extension-apiserver-authentication``, as for any aggregated
  API server (read at start; its CA changes rarely, and a restart picks it up).
- **Authorization** is a SubjectAccessReview per question (``review.StoreReviewer``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import signal
import ssl
import tempfile
from pathlib import Path

import click
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import certconfig, errors, pki
from cdi.apiserver import kubeapi, review
from cdi.backends import kube_config
from cdi.backends.kube import KubeStore
from cdi.backends.port import ObjectStore
from cdi.cli import certrotation
from cdi.manifests import rbac as manifest_rbac
from cdi.manifests import workloads

log = logging.getLogger("cdi.apiserver")

SIGNER = "cdi-apiserver-signer"


async def signing_key(store: ObjectStore, namespace: str) -> rsa.RSAPrivateKey:
    """The token signing key from its Secret; made (by whoever comes first) if missing."""
    name = workloads.SIGNING_KEY_SECRET
    for _ in range(3):
        try:
            secret = await store.get("Secret", name, namespace)
        except errors.NotFound:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            private = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            try:
                await store.create({
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app": "containerized-data-importer"}},
                    "data": {"id_rsa": base64.b64encode(private).decode(),
                             "id_rsa.pub": base64.b64encode(public).decode()}})
                log.info("created the token signing key %s/%s", namespace, name)
                return key
            except errors.AlreadyExists:
                continue  # another replica won: use its key
        pem = base64.b64decode((secret.get("data") or {}).get("id_rsa", ""))
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise click.ClickException(f"Secret {namespace}/{name}: id_rsa is not an RSA key")
        return loaded
    raise RuntimeError(f"Secret {namespace}/{name} keeps changing")


def service_hosts(namespace: str) -> tuple[str, ...]:
    svc = workloads.API_SERVICE_NAME
    return (svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc",
            f"{svc}.{namespace}.svc.cluster.local")


async def inject_ca(store: ObjectStore, ca_pem: bytes) -> None:
    """Put our CA into the APIService and the webhook configurations (those that exist)."""
    bundle = base64.b64encode(ca_pem).decode()
    try:
        await store.patch("APIService", manifest_rbac.API_SERVICE, None,
                          {"spec": {"caBundle": bundle}})
    except errors.NotFound:
        log.warning("APIService %s not found: the upload API is not registered",
                    manifest_rbac.API_SERVICE)
    for kind, names in (("ValidatingWebhookConfiguration", manifest_rbac.VALIDATING_WEBHOOKS),
                        ("MutatingWebhookConfiguration", manifest_rbac.MUTATING_WEBHOOKS)):
        for name in names:
            try:
                config = await store.get(kind, name)
            except errors.NotFound:
                continue
            hooks = config.get("webhooks") or []
            if all((h.get("clientConfig") or {}).get("caBundle") == bundle for h in hooks):
                continue
            for hook in hooks:
                hook.setdefault("clientConfig", {})["caBundle"] = bundle
            await store.replace(config)
            log.info("CA bundle set on %s %s", kind, name)


class Serving:
    """The serving certificate: loaded once (cert-manager) or issued and re-issued."""

    def __init__(self, context: ssl.SSLContext, workdir: Path, ca: pki.Signer | None,
                 namespace: str, *, certs: certconfig.CertConfig | None = None) -> None:
        self.context = context
        self._workdir = workdir
        self._ca = ca
        self._namespace = namespace
        self._certs = certs or certconfig.CertConfig()
        self.cert_pem = b""

    def issue(self, now: datetime.datetime | None = None) -> None:
        assert self._ca is not None
        issued = self._ca.issue(workloads.API_SERVICE_NAME, hosts=service_hosts(self._namespace),
                                lifetime=self._certs.server.duration, now=now)
        cert, key = self._workdir / "tls.crt", self._workdir / "tls.key"
        pki.write_private(key, issued.key_pem)
        cert.write_bytes(issued.cert_pem)
        self.context.load_cert_chain(str(cert), str(key))
        self.cert_pem = issued.cert_pem
        log.info("serving certificate issued for %s", ", ".join(service_hosts(self._namespace)))

    async def refresh(self, store: ObjectStore, now: datetime.datetime) -> datetime.datetime:
        """One look: rotate the CA if due (and publish the changed bundle), re-issue the
        serving certificate if due; when the next look is due."""
        assert self._ca is not None
        bundle = self._ca.bundle_pem
        await certrotation.signer(store, self._namespace, SIGNER, self._workdir,
                                  lifetime=self._certs.ca, now=now, into=self._ca)
        if self._ca.bundle_pem != bundle:
            await inject_ca(store, self._ca.bundle_pem)
        due = certrotation.leaf_due(self.cert_pem, self._ca, self._certs.server, now)
        if due is None:
            self.issue(now)
            due = self._certs.server.renew_at(now + self._certs.server.duration)
        return min(due, certrotation.next_due(self._ca, self._certs.ca))

    async def rotate(self, store: ObjectStore, due: datetime.datetime,
                     clock: certrotation.Clock = certrotation.utcnow) -> None:
        """``refresh`` whenever something is due, until cancelled."""
        while self._ca is not None:
            await asyncio.sleep(certrotation.wait_for(due, self._certs, clock()))
            now = clock()
            try:
                due = await self.refresh(store, now)
            except errors.APIError as e:
                log.warning("rotating the serving certificate: %s", e.message)
                due = now + certrotation.RETRY


async def run(*, kubeconfig: Path | None, context: str | None, namespace: str | None,
              address: str, certificates: str, cert_dir: Path,
              certs: certconfig.CertConfig | None = None, stop: asyncio.Event) -> None:
    config = kube_config.load(kubeconfig, context)
    ns = namespace or config.namespace
    async with KubeStore(config) as store:
        key = await signing_key(store, ns)
        auth = await store.get("ConfigMap", kubeapi.AUTH_CONFIGMAP[1], kubeapi.AUTH_CONFIGMAP[0])
        headers = kubeapi.RequestHeaderConfig.from_configmap(auth)
        with tempfile.TemporaryDirectory(prefix="cdi-apiserver-") as tmp:
            rotating: asyncio.Future[None] | None = None
            if certificates == "cert-manager":
                ctx = kubeapi.server_context(str(cert_dir / "tls.crt"),
                                             str(cert_dir / "tls.key"), headers)
            else:
                certs = certs or certconfig.CertConfig()
                now = certrotation.utcnow()
                ca = await certrotation.signer(store, ns, SIGNER, Path(tmp), lifetime=certs.ca,
                                               now=now)
                ctx = kubeapi.server_context_without_cert(headers)
                serving = Serving(ctx, Path(tmp), ca, ns, certs=certs)
                await inject_ca(store, ca.bundle_pem)
                due = await serving.refresh(store, now)
                rotating = asyncio.ensure_future(serving.rotate(store, due))
            app = kubeapi.create_kube_app(store, key=key,
                                          reviewer=review.StoreReviewer(store), config=headers)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            host, _, port = address.rpartition(":")
            await web.TCPSite(runner, host.strip("[]") or None, int(port),
                              ssl_context=ctx).start()
            log.info("LISTEN address=%s certificates=%s namespace=%s", address, certificates,
                     ns)
            try:
                await stop.wait()
            finally:
                if rotating is not None:
                    rotating.cancel()
                await runner.cleanup()


@click.command("apiserver")
@click.option("--kubeconfig", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Default: $KUBECONFIG, the Pod's service account, ~/.kube/config.")
@click.option("--context", default=None, help="kubeconfig context (default: current).")
@click.option("--namespace", default=None, envvar="POD_NAMESPACE",
              help="Namespace of the Secrets (default: $POD_NAMESPACE, the service "
                   "account's, or the context's).")
@click.option("--address", default=":8443", show_default=True, help="host:port to serve on.")
@click.option("--certificates", envvar="CDI_CERTIFICATES", default="generate",
              show_default=True, type=click.Choice(["generate", "cert-manager"]),
              help="Issue our own serving certificate, or read cert-manager's ($CDI_CERTIFICATES).")
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/var/run/certs/server"), show_default=True,
              help="tls.crt and tls.key, with --certificates cert-manager.")
@certrotation.lifetime_options
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def apiserver(kubeconfig: Path | None, context: str | None, namespace: str | None,
              address: str, certificates: str, cert_dir: Path, certs: certconfig.CertConfig,
              verbose: bool) -> None:
    """Serve upload.cdi.kubevirt.io and the admission webhooks on a Kubernetes cluster."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(kubeconfig=kubeconfig, context=context, namespace=namespace,
                  address=address, certificates=certificates, cert_dir=cert_dir,
                  certs=certs, stop=stop)
    try:
        asyncio.run(main())
    except (kube_config.ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from e
