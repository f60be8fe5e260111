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


def _decode(secret: Obj, key: str) -> str | None:
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
        username, password = _decode(secret, "accessKeyId"), _decode(secret, "secretKey")
        docker_config = _decode(secret, ".dockerconfigjson") or _decode(secret, ".dockercfg")
    ca_pems: tuple[str, ...] = ()
    cm_name = registry.get("certConfigMap")
    if cm_name:
        try:
            cm = await store.get("ConfigMap", cm_name, namespace)
        except api_errors.NotFound as e:
            raise PollError(f'configmap "{cm_name}" not found') from e
        ca_pems = tuple(str(v) for _, v in sorted((cm.get("data") or {}).items()))
    insecure = False
    proxy = ("", "", "")
    try:
        config = await store.get("CDIConfig", "config")
    except api_errors.NotFound:
        config = {}
    insecure = registry_host(url) in ((config.get("spec") or {}).get("insecureRegistries") or ())
    p = (config.get("status") or {}).get("importProxy") or {}
    proxy = (str(p.get("HTTPProxy") or ""), str(p.get("HTTPSProxy") or ""),
             str(p.get("noProxy") or ""))
    return PollTarget(url, username, password, docker_config, ca_pems, insecure, proxy)


def poll_digest(target: PollTarget) -> str:
    """The digest the reference's tag names now (the index digest for multi-arch images).

    Blocking; raises PollError with a reason fit for a log line or an event.
    """
    try:
        ref = oci.parse_reference(target.url)
    except oci.InvalidReference as e:
        raise PollError(str(e)) from e
    if ref.digest:
        return ref.digest  # pinned: nothing to poll
    with tempfile.TemporaryDirectory(prefix="cdi-cronpoll-") as tmp:
        cert_dir = None
        if target.ca_pems:
            cert_dir = Path(tmp)
            for i, pem in enumerate(target.ca_pems):
                (cert_dir / f"ca-{i}.crt").write_text(pem)
        try:
            return _poll(ref, target, cert_dir)
        except (oci.RegistryError, importer_errors.Error) as e:
            raise PollError(str(e)) from e


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


def _poll(ref: oci.Reference, target: PollTarget, cert_dir: Path | None) -> str:
    settings = _settings(ref, target, cert_dir)
    session = http.make_session(settings)
    try:
        client = oci.Client(ref, settings=settings, session=session, insecure=target.insecure)
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
            log.info("POLL image=%s digest=%s (HEAD)", ref, digest)
            return digest
        if status not in (200, 405):
            # HEAD carries no error body; GET says why in the registry's words.
            log.info("POLL image=%s HEAD status=%d, asking with GET", ref, status)
        content, _ = client.get_manifest(ref.reference)
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        log.info("POLL image=%s digest=%s (GET)", ref, digest)
        return digest
    finally:
        session.close()
