"""Digest polling for DataImportCron registry sources: one manifest request per run.

CDI polls a ``docker://`` source from a CronJob whose pod runs
``cdi-source-update-poller``: it reads only the manifest (the index for a
multi-arch image) and records its ``sha256:`` digest on the cron.  ``cdi
serve`` has no CronJobs, so the controller polls in-process through the same
OCI client the importer uses (``importer.oci``): a ``HEAD`` with the manifest
media types, taking ``Docker-Content-Digest``; a registry that does not send
it gets a ``GET`` and the sha256 of the body.  The calls block, so
``poll_digest`` is meant for ``asyncio.to_thread``.

What the poll needs from the store (pull secret, CA ConfigMap, CDIConfig's
``insecureRegistries`` and import proxy) is gathered by ``gather`` first, so
the thread touches nothing but the network and a temporary CA directory.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import re
import tempfile
import threading
import time
from pathlib import Path

import requests

from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from importer import errors as importer_errors
from importer import oci
from importer.settings import Settings
from importer.sources import http

log = logging.getLogger(__name__)

POLL_STALL_TIMEOUT = 30.0  # seconds without a byte from the registry before a poll fails
CLIENT_IDLE = 600.0  # seconds a registry client unused by any poll is kept


class PollError(Exception):
    """The digest could not be read; the message says why (no credentials in it)."""


@dataclasses.dataclass(frozen=True)
class PollTarget:
    """Everything one poll needs, read from the store beforehand."""

    url: str  # docker://host[:port]/repo[:tag]
    username: str | None = None
    password: str | None = None
    docker_config: str | None = None  # a .dockerconfigjson document
    ca_pems: tuple[str, ...] = ()
    insecure: bool = False
    proxy: tuple[str, str, str] = ("", "", "")  # http, https, no_proxy


def registry_host(url: str) -> str:
    """``host[:port]`` of a ``docker://`` reference, as insecureRegistries lists it."""
    try:
        return oci.parse_reference(url).registry
    except oci.InvalidReference:
        return ""


def decode(secret: Obj, key: str) -> str | None:
    data = secret.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(str(data[key])).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
    string_data = secret.get("stringData") or {}
    return str(string_data[key]) if key in string_data else None


async def gather(store: ObjectStore, namespace: str, registry: Obj) -> PollTarget:
    """The poll target of a template's ``source.registry`` in NAMESPACE."""
    url = str(registry.get("url") or "")
    username = password = docker_config = None
    secret_name = registry.get("secretRef")
    if secret_name:
        try:
            secret = await store.get("Secret", secret_name, namespace)
        except api_errors.NotFound as e:
            raise PollError(f'secret "{secret_name}" not found') from e
        username, password = decode(secret, "accessKeyId"), decode(secret, "secretKey")
        docker_config = decode(secret, ".dockerconfigjson") or decode(secret, ".dockercfg")
    ca_pems: tuple[str, ...] = ()
    cm_name = registry.get("certConfigMap")
    if cm_name:
        try:
            cm = await store.get("ConfigMap", cm_name, namespace)
        except api_errors.NotFound as e:
            raise PollError(f'configmap "{cm_name}" not found') from e
        ca_pems = tuple(str(v) for _, v in sorted((cm.get("data") or {}).items()))
    config = await _config(store)
    insecure = registry_host(url) in ((config.get("spec") or {}).get("insecureRegistries") or ())
    return PollTarget(url, username, password, docker_config, ca_pems, insecure,
                      proxy_of(config))


async def _config(store: ObjectStore) -> Obj:
    try:
        return await store.get("CDIConfig", "config")
    except api_errors.NotFound:
        return {}


def proxy_of(config: Obj) -> tuple[str, str, str]:
    """CDIConfig ``status.importProxy`` as (http, https, no_proxy), as imports use it."""
    p = (config.get("status") or {}).get("importProxy") or {}
    return (str(p.get("HTTPProxy") or ""), str(p.get("HTTPSProxy") or ""),
            str(p.get("noProxy") or ""))


async def import_proxy(store: ObjectStore) -> tuple[str, str, str]:
    return proxy_of(await _config(store))


class _Client:
    """A registry client kept between polls of one target: its session (TLS context,
    keep-alive connection), the scheme its ping found, its token, its CA directory."""

    def __init__(self, ref: oci.Reference, target: PollTarget) -> None:
        self.lock = threading.Lock()  # one request at a time on this client
        self.used = time.monotonic()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        cert_dir = None
        if target.ca_pems:
            self._tmp = tempfile.TemporaryDirectory(prefix="cdi-cronpoll-")
            cert_dir = Path(self._tmp.name)
            for i, pem in enumerate(target.ca_pems):
                (cert_dir / f"ca-{i}.crt").write_text(pem)
        settings = _settings(ref, target, cert_dir)
        self.session = http.make_session(settings)
        self.client = oci.Client(ref, settings=settings, session=self.session,
                                 insecure=target.insecure)

    def close(self) -> None:
        self.session.close()
        if self._tmp is not None:
            self._tmp.cleanup()


_clients: dict[PollTarget, _Client] = {}
_clients_lock = threading.Lock()


def _client(ref: oci.Reference, target: PollTarget) -> tuple[_Client, bool]:
    """The kept client of TARGET (same URL, credentials, CAs, proxy), and whether it is
    new; idle ones are closed."""
    now = time.monotonic()
    with _clients_lock:
        for key, idle in list(_clients.items()):
            if now - idle.used > CLIENT_IDLE and not idle.lock.locked():
                del _clients[key]
                idle.close()
        found = _clients.get(target)
        fresh = found is None
        if found is None:
            found = _clients[target] = _Client(ref, target)
        found.used = now
        return found, fresh


def _forget(target: PollTarget, client: _Client) -> None:
    with _clients_lock:
        if _clients.get(target) is client:
            del _clients[target]
    client.close()


def poll_digest(target: PollTarget) -> str:
    """The digest the reference's tag names now (the index digest for multi-arch images).

    Blocking; raises PollError with a reason fit for a log line or an event.  Polls of
    the same target share one client (one TLS context, a kept-alive connection, one
    registry ping and token), so a steady poll costs one manifest request.  A kept
    client whose poll failed is dropped and the poll tried once more with a new one.
    """
    try:
        ref = oci.parse_reference(target.url)
    except oci.InvalidReference as e:
        raise PollError(str(e)) from e
    if ref.digest:
        return ref.digest  # pinned: nothing to poll
    while True:
        kept, fresh = _client(ref, target)
        try:
            with kept.lock:
                return _poll(ref, kept.client)
        except (oci.RegistryError, importer_errors.Error, PollError) as e:
            _forget(target, kept)
            if fresh and isinstance(e, PollError):
                raise
            if fresh:
                raise PollError(str(e)) from e
            # A kept client may hold a connection the registry closed: once more, afresh.


def _settings(ref: oci.Reference, target: PollTarget, cert_dir: Path | None) -> Settings:
    username, password = target.username, target.password
    if not (username and password) and target.docker_config:
        found = oci.credentials_from_dockerconfig(target.docker_config, ref.registry)
        if found is not None:
            username, password = found
    return Settings(source="registry", endpoint=f"docker://{ref}", access_key=username,
                    secret_key=password, cert_dir=cert_dir, insecure_registry=target.insecure,
                    insecure_tls=target.insecure, stall_timeout=POLL_STALL_TIMEOUT,
                    http_proxy=target.proxy[0] or None, https_proxy=target.proxy[1] or None,
                    no_proxy=target.proxy[2] or None)


def _poll(ref: oci.Reference, client: oci.Client) -> str:
    path = f"/v2/{ref.repository}/manifests/{ref.reference}"
    where = f"{ref.registry}/{ref.repository}"
    try:
        r = client.request("HEAD", path, headers={"Accept": oci.ACCEPT})
    except requests.RequestException as e:
        raise PollError(f"reading manifest {ref.reference} in {where}: "
                        f"{http.describe(e)}") from e
    with r:
        digest = r.headers.get("Docker-Content-Digest", "")
        status = r.status_code
    if status == 200 and re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        log.debug("POLL image=%s digest=%s (HEAD)", ref, digest)
        return digest
    if status not in (200, 405):
        # HEAD carries no error body; GET says why in the registry's words.
        log.info("POLL image=%s HEAD status=%d, asking with GET", ref, status)
    content, _ = client.get_manifest(ref.reference)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    log.info("POLL image=%s digest=%s (GET)", ref, digest)
    return digest
