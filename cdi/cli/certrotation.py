"""The generated CAs and certificates on a cluster, kept within their configured lifetimes.

With ``CDI_CERTIFICATES=generate`` (the chart's default) ``cdi controller`` and
``cdi apiserver`` make the TLS material themselves, as CDI's operator does
(``pkg/operator/controller/certrotation.go``), and this module is how:

- **CAs.**  Each signer (``cdi-uploadproxy-signer``, ``cdi-uploadserver-signer``,
  ``cdi-uploadserver-client-signer``, ``cdi-apiserver-signer``) is a
  ``kubernetes.io/tls`` Secret made by whoever comes first.  It lasts
  ``certificates.ca.duration``; once within ``certificates.ca.renewBefore`` of its
  end (or unreadable) a new CA replaces it in the Secret (optimistic concurrency:
  one replica wins, the others read its CA).  ``pki.Signer.load`` swaps it into
  the signer objects the controllers hold, so what they issue next comes from it.
- **Bundles.**  The ConfigMap ``<signer>-bundle`` (``ca-bundle.crt``) carries the
  current CA first and every older one until it expires, as CDI's does, so a
  certificate issued just before a rotation stays trusted.  The bundles are what
  verifiers get: the upload proxy (upload servers' CA), upload servers (``ca.crt``:
  the client CA), CDIConfig ``status.uploadProxyCA``, and the APIService and
  webhook ``caBundle`` the apiserver writes.
- **Leaves.**  A certificate Secret (``cdi-uploadproxy-server-cert``,
  ``cdi-uploadserver-client-cert``) is re-issued from the newest CA for
  ``certificates.server.duration`` when missing, unreadable, within
  ``certificates.server.renewBefore`` of its end, or from a CA no longer in the
  bundle.
- **When to look.**  Each pass returns when something is next due (a CA or leaf
  renewal, an old CA leaving its bundle); callers sleep until then, but never
  longer than ``CertConfig.max_check`` (half the shortest renewBefore, at most 12 h).

With cert-manager the Secrets are cert-manager's: signers are only read (and the
bundle still keeps their predecessors), and no leaf is issued here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cdi.api import errors, pki
from cdi.api.certconfig import (
    DEFAULT_CA,
    DEFAULT_SERVER,
    CertConfig,
    CertConfigError,
    Lifetime,
    format_duration,
)
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger("cdi.certrotation")

SERVER_SIGNER = "cdi-uploadserver-signer"
CLIENT_SIGNER = "cdi-uploadserver-client-signer"
PROXY_SIGNER = "cdi-uploadproxy-signer"
SERVER_SIGNER_BUNDLE = "cdi-uploadserver-signer-bundle"
CLIENT_CERT = "cdi-uploadserver-client-cert"
PROXY_CERT = "cdi-uploadproxy-server-cert"
BUNDLE_KEY = "ca-bundle.crt"
RETRY = datetime.timedelta(minutes=1)  # after a failed pass
LABELS = {"app": "containerized-data-importer"}

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def bundle_name(signer_name: str) -> str:
    return f"{signer_name}-bundle"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _get(store: ObjectStore, kind: str, name: str, namespace: str) -> Obj | None:
    try:
        return await store.get(kind, name, namespace)
    except errors.NotFound:
        return None


def _ca_pair(secret: Obj | None) -> tuple[x509.Certificate, bytes, bytes] | None:
    """The CA certificate and its PEMs in a signer Secret, or None if it holds none."""
    data = (secret or {}).get("data") or {}
    try:
        cert_pem, key_pem = base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])
        return x509.load_pem_x509_certificate(cert_pem), cert_pem, key_pem
    except (KeyError, ValueError):
        return None


async def signer(store: ObjectStore, namespace: str, name: str, workdir: Path, *,
                 lifetime: Lifetime | None = None, now: datetime.datetime | None = None,
                 into: pki.Signer | None = None) -> pki.Signer:
    """The CA kept in Secret NAME, and its bundle ConfigMap (made if missing).

    With LIFETIME (generate mode) a CA that is unreadable or within its renewBefore
    of the end is replaced; without, the Secret's CA is used as it is (cert-manager's).
    INTO, a signer from an earlier call, is updated in place and returned.
    """
    now = now or utcnow()
    directory = workdir / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(5):
        secret = await _get(store, "Secret", name, namespace)
        pair = _ca_pair(secret)
        due = pair is None or (lifetime is not None
                               and now >= lifetime.renew_at(pair[0].not_valid_after_utc))
        previous = pair[0] if pair is not None and due else None
        if due:
            cert_pem, key_pem = pki.make_ca(f"{name}@{int(now.timestamp())}",
                                            lifetime=(lifetime or DEFAULT_CA).duration, now=now)
            data = {"tls.crt": _b64(cert_pem), "tls.key": _b64(key_pem)}
            try:
                if secret is None:
                    await store.create({
                        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                        "metadata": {"name": name, "namespace": namespace,
                                     "labels": dict(LABELS)},
                        "data": data})
                else:
                    secret["data"] = data
                    await store.replace(secret)
            except (errors.AlreadyExists, errors.Conflict):
                continue  # another replica was quicker: use its CA
            log.info("CA %s %s/%s until=%s", "made" if secret is None else "rotated",
                     namespace, name, now + (lifetime or DEFAULT_CA).duration)
        else:
            assert pair is not None
            _, cert_pem, key_pem = pair
        bundle = await ensure_bundle(store, namespace, bundle_name(name), cert_pem, now,
                                     previous=previous)
        if into is None:
            pki.write_private(directory / "ca.key", key_pem)
            (directory / "ca.crt").write_bytes(cert_pem)
            into = pki.Signer(directory, name)
            into.bundle_pem = bundle
        elif into.cert_pem != cert_pem or into.bundle_pem != bundle:
            into.load(cert_pem, key_pem, bundle)
        return into
    raise RuntimeError(f"Secret {namespace}/{name} keeps changing")


async def ensure_bundle(store: ObjectStore, namespace: str, name: str, ca_pem: bytes,
                        now: datetime.datetime, *,
                        previous: x509.Certificate | None = None) -> bytes:
    """ConfigMap NAME's ``ca-bundle.crt``: CA_PEM first, then the older CAs it held (and
    PREVIOUS, the CA just replaced) that have not expired yet, newest first; its PEM."""
    current = x509.load_pem_x509_certificate(ca_pem)
    for _ in range(5):
        cm = await _get(store, "ConfigMap", name, namespace)
        held = pki.load_bundle(str(((cm or {}).get("data") or {}).get(BUNDLE_KEY, "")).encode())
        if previous is not None and previous not in held:
            held.append(previous)
        older = sorted((c for c in held if c != current and c.not_valid_after_utc > now),
                       key=lambda c: c.not_valid_after_utc, reverse=True)
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [current, *older])
        data = {BUNDLE_KEY: pem.decode()}
        try:
            if cm is None:
                await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": name, "namespace": namespace,
                                                 "labels": dict(LABELS)},
                                    "data": data})
            elif cm.get("data") != data:
                cm["data"] = data
                await store.replace(cm)
                log.info("CA bundle %s/%s holds %d CAs", namespace, name, 1 + len(older))
        except (errors.AlreadyExists, errors.Conflict):
            continue
        return pem
    raise RuntimeError(f"ConfigMap {namespace}/{name} keeps changing")


def next_due(ca: pki.Signer, lifetime: Lifetime | None) -> datetime.datetime:
    """When CA needs a look: its renewal (if we rotate it), or an old CA leaving its bundle."""
    times = [c.not_valid_after_utc for c in pki.load_bundle(ca.bundle_pem)]
    if lifetime is not None:
        times.append(lifetime.renew_at(ca.not_after))
    return min(times, default=ca.not_after)


def leaf_due(cert_pem: bytes, ca: pki.Signer, lifetime: Lifetime,
             now: datetime.datetime) -> datetime.datetime | None:
    """When the certificate in CERT_PEM is due for renewal; None if it is due now
    (unreadable, within renewBefore of its end, or from a CA no longer trusted)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    renew = lifetime.renew_at(cert.not_valid_after_utc)
    trusted = any(pki.issued_by(cert, c) for c in pki.load_bundle(ca.bundle_pem))
    return renew if trusted and now < renew else None


async def leaf(store: ObjectStore, namespace: str, name: str, ca: pki.Signer,
               issue: Callable[[datetime.datetime], pki.Issued], *, lifetime: Lifetime,
               now: datetime.datetime) -> datetime.datetime:
    """The certificate Secret NAME from CA, (re-)issued when due; when it is next due."""
    secret = await _get(store, "Secret", name, namespace)
    data = (secret or {}).get("data") or {}
    try:
        held = base64.b64decode(data["tls.crt"])
    except (KeyError, ValueError):
        held = b""
    due = leaf_due(held, ca, lifetime, now)
    if due is not None:
        if data.get("ca.crt") != _b64(ca.bundle_pem) and secret is not None:
            secret["data"] = {**data, "ca.crt": _b64(ca.bundle_pem)}
            try:
                await store.replace(secret)
            except errors.Conflict:
                pass  # another replica was quicker
        return due
    issued = issue(now)
    new = {"tls.crt": _b64(issued.cert_pem), "tls.key": _b64(issued.key_pem),
           "ca.crt": _b64(ca.bundle_pem)}
    try:
        if secret is None:
            await store.create({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                                "metadata": {"name": name, "namespace": namespace,
                                             "labels": dict(LABELS)},
                                "data": new})
            log.info("created Secret %s/%s", namespace, name)
        else:
            secret["data"] = new
            await store.replace(secret)
            log.info("renewed Secret %s/%s", namespace, name)
    except (errors.AlreadyExists, errors.Conflict):
        pass  # another replica was quicker
    return lifetime.renew_at(now + lifetime.duration)


@dataclasses.dataclass(frozen=True)
class Published:
    proxy_ca: str  # the upload proxy's CA bundle ("" when cert-manager makes its certificate)
    next_due: datetime.datetime


def _generate() -> bool:
    return os.environ.get("CDI_CERTIFICATES", "generate") != "cert-manager"


def ca_lifetime(certs: CertConfig) -> Lifetime | None:
    """The lifetime we keep CAs in: ``certs.ca``, or None when cert-manager makes them."""
    return certs.ca if _generate() else None


async def rotate_upload_pki(store: ObjectStore, namespace: str, server_signer: pki.Signer,
                            client_signer: pki.Signer, workdir: Path, *,
                            certs: CertConfig | None = None,
                            now: datetime.datetime | None = None) -> Published:
    """One pass over the upload PKI: the upload servers' and the client signers (rotated
    in place in generate mode) with their bundles, then, unless cert-manager makes them,
    the proxy's signer, its serving certificate and its client certificate."""
    certs = certs or CertConfig()
    now = now or utcnow()
    lifetime = ca_lifetime(certs)
    due: list[datetime.datetime] = []
    for ca, name in ((server_signer, SERVER_SIGNER), (client_signer, CLIENT_SIGNER)):
        await signer(store, namespace, name, workdir, lifetime=lifetime, now=now, into=ca)
        if lifetime is not None:
            ca.leaf_lifetime = certs.server.duration
        due.append(next_due(ca, lifetime))
    if lifetime is None:
        return Published("", min(due))
    proxy_signer = await signer(store, namespace, PROXY_SIGNER, workdir, lifetime=certs.ca,
                                now=now)
    due.append(next_due(proxy_signer, certs.ca))
    svc = "cdi-uploadproxy"
    hosts = (svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc",
             f"{svc}.{namespace}.svc.cluster.local")
    duration = certs.server.duration
    due.append(await leaf(store, namespace, CLIENT_CERT, client_signer, lambda t: (
        client_signer.issue(pki.UPLOAD_CLIENT_NAME, client=True, lifetime=duration, now=t)),
        lifetime=certs.server, now=now))
    due.append(await leaf(store, namespace, PROXY_CERT, proxy_signer, lambda t: (
        proxy_signer.issue(svc, hosts=hosts, lifetime=duration, now=t)),
        lifetime=certs.server, now=now))
    return Published(proxy_signer.bundle_pem.decode(), min(due))


async def publish_upload_pki(store: ObjectStore, namespace: str, server_signer: pki.Signer,
                             client_signer: pki.Signer, workdir: Path, *,
                             certs: CertConfig | None = None,
                             now: datetime.datetime | None = None) -> str:
    """``rotate_upload_pki``, for the proxy's CA bundle only."""
    published = await rotate_upload_pki(store, namespace, server_signer, client_signer,
                                        workdir, certs=certs, now=now)
    return published.proxy_ca


def wait_for(due: datetime.datetime, certs: CertConfig, now: datetime.datetime) -> float:
    """Seconds to sleep until DUE, at least one and at most ``certs.max_check``."""
    return max(1.0, min((due - now).total_seconds(), certs.max_check.total_seconds()))


async def keep_rotating(store: ObjectStore, namespace: str, server_signer: pki.Signer,
                        client_signer: pki.Signer, workdir: Path, *, certs: CertConfig,
                        due: datetime.datetime, on_proxy_ca: Callable[[str], None],
                        clock: Clock = utcnow) -> None:
    """``rotate_upload_pki`` whenever something is due, until cancelled; ON_PROXY_CA gets
    the proxy's CA bundle after each pass."""
    while True:
        await asyncio.sleep(wait_for(due, certs, clock()))
        now = clock()
        try:
            published = await rotate_upload_pki(store, namespace, server_signer,
                                                client_signer, workdir, certs=certs, now=now)
        except errors.APIError as e:
            log.warning("rotating the upload certificates: %s", e.message)
            due = now + RETRY
            continue
        due = published.next_due
        on_proxy_ca(published.proxy_ca)


_OPTIONS = (
    ("--ca-duration", "CDI_CA_DURATION", DEFAULT_CA.duration, "How long a generated CA lasts"),
    ("--ca-renew-before", "CDI_CA_RENEW_BEFORE", DEFAULT_CA.renew_before,
     "Replace a generated CA this long before its end"),
    ("--server-duration", "CDI_SERVER_DURATION", DEFAULT_SERVER.duration,
     "How long a generated server or client certificate lasts"),
    ("--server-renew-before", "CDI_SERVER_RENEW_BEFORE", DEFAULT_SERVER.renew_before,
     "Replace a generated certificate this long before its end"),
)


def lifetime_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The four lifetime options of a command (the chart's ``certificates.ca`` and
    ``certificates.server``), handed to it as one checked ``certs: CertConfig``."""
    @functools.wraps(func)
    def wrapper(*args: Any, ca_duration: str, ca_renew_before: str, server_duration: str,
                server_renew_before: str, **kwargs: Any) -> Any:
        try:
            certs = CertConfig.parse(ca_duration=ca_duration, ca_renew_before=ca_renew_before,
                                     server_duration=server_duration,
                                     server_renew_before=server_renew_before)
        except CertConfigError as e:
            raise click.ClickException(str(e)) from e
        return func(*args, certs=certs, **kwargs)

    decorated: Callable[..., Any] = wrapper
    for flag, env, default, text in reversed(_OPTIONS):
        decorated = click.option(flag, envvar=env, default=format_duration(default),
                                 show_default=True, help=f"{text} (${env}).")(decorated)
    return decorated
