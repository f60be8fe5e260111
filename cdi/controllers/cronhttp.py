"""HTTP sources in a DataImportCron: a URL's version is its validator (ETag or Last-Modified).

CDI polls only registry (and ImageStream/PVC) sources; its users ask for
plain HTTP URLs too (a ``.../latest/disk.qcow2`` that a mirror replaces in
place).  An HTTP server names a file's version with a validator, so a poll is
one conditional request: ``HEAD`` with ``If-None-Match: <last ETag>`` (or
``If-Modified-Since: <last Last-Modified>``); 304 means unchanged.  A server
that refuses HEAD gets the same ``GET``, closed before its body is read.

- The identity is the strong ETag, else Last-Modified; a server that sends
  neither (or only a weak ETag) cannot be polled, and the message says so.
- The digest recorded on the cron is ``sha256:<hex of sha256(validator)>``, so
  imports are named ``<managedDataSource>-<12 hex>`` like registry ones.  The
  validator itself is kept in ``storage.import.sourceValidator`` for the next
  conditional request.
- The import is pinned to the version polled: its DataVolume carries
  ``If-Match: <ETag>`` (or ``If-Unmodified-Since``) in ``extraHeaders``, so a
  file replaced between poll and import fails that import (412) instead of
  importing a version the cron never recorded; the next poll sees the new one.

Credentials (``secretRef``), extra headers (plain and from Secrets), the CA
ConfigMap, ``insecureSkipVerify`` and CDIConfig's import proxy are read as the
HTTP import reads them, by ``gather``, before the blocking poll runs in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path

import requests

from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import cronpoll
from importer.settings import Settings
from importer.sources import http

log = logging.getLogger(__name__)

ANN_VALIDATOR = "cdi.kubevirt.io/storage.import.sourceValidator"
ETAG = "ETag"
LAST_MODIFIED = "Last-Modified"
PIN_HEADERS = ("if-match", "if-unmodified-since")
HEAD_REFUSED = (400, 403, 405, 501)  # a GET may still work (signed URLs, servers without HEAD)


class Unpollable(cronpoll.PollError):
    """The server gives nothing that tells one version of the file from another."""


@dataclasses.dataclass(frozen=True)
class Validator:
    """What names the file's version: a strong ETag, or else its Last-Modified date."""

    kind: str  # ETAG | LAST_MODIFIED
    value: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.value.encode()).hexdigest()

    def text(self) -> str:
        """As kept in the annotation: ``ETag: "abc"`` or ``Last-Modified: <date>``."""
        return f"{self.kind}: {self.value}"

    @classmethod
    def parse(cls, text: str) -> Validator | None:
        kind, sep, value = text.partition(": ")
        if not sep or kind not in (ETAG, LAST_MODIFIED) or not value:
            return None
        return cls(kind, value)

    def conditional(self) -> dict[str, str]:
        """The header that asks "changed since this version?" (304 if not)."""
        name = "If-None-Match" if self.kind == ETAG else "If-Modified-Since"
        return {name: self.value}

    def pin(self) -> str:
        """The header that makes an import fail (412) if the file is not this version."""
        name = "If-Match" if self.kind == ETAG else "If-Unmodified-Since"
        return f"{name}: {self.value}"


@dataclasses.dataclass(frozen=True)
class HTTPTarget:
    """Everything one poll needs, read from the store beforehand."""

    url: str
    username: str | None = None
    password: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    ca_pems: tuple[str, ...] = ()
    insecure_tls: bool = False
    proxy: tuple[str, str, str] = ("", "", "")  # http, https, no_proxy
    last: Validator | None = None


def source(dic: Obj) -> Obj | None:
    """The template's ``source.http`` if it names a URL."""
    src = ((((dic.get("spec") or {}).get("template") or {}).get("spec") or {})
           .get("source") or {}).get("http")
    return src if isinstance(src, dict) and src.get("url") else None


def polled(dic: Obj) -> bool:
    """Whether the cron polls an HTTP URL (it has one and a schedule)."""
    return source(dic) is not None and bool((dic.get("spec") or {}).get("schedule"))


def validator_of(headers: requests.structures.CaseInsensitiveDict[str]) -> Validator | None:
    etag = headers.get("ETag", "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return Validator(ETAG, etag)
    modified = headers.get("Last-Modified", "").strip()
    return Validator(LAST_MODIFIED, modified) if modified else None


def _header_line(variable: str, line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if not sep or not name.strip() or any(c in line for c in "\r\n"):
        raise cronpoll.PollError(f"{variable}: a header is 'Name: value' on one line")
    return name.strip(), value.strip()


async def gather(store: ObjectStore, namespace: str, src: Obj,
                 last: Validator | None) -> HTTPTarget:
    """The poll target of a template's ``source.http`` in NAMESPACE."""
    username = password = None
    secret_name = src.get("secretRef")
    if secret_name:
        secret = await _get(store, "Secret", secret_name, namespace)
        username = cronpoll.decode(secret, "accessKeyId")
        password = cronpoll.decode(secret, "secretKey")
    headers = [_header_line("extraHeaders", str(h)) for h in src.get("extraHeaders") or []
               if str(h).partition(":")[0].strip().lower() not in PIN_HEADERS]
    for name in src.get("secretExtraHeaders") or []:
        secret = await _get(store, "Secret", name, namespace)
        keys = sorted({*(secret.get("data") or {}), *(secret.get("stringData") or {})})
        for key in keys:
            line = cronpoll.decode(secret, key)
            if line is not None and not key.startswith("."):
                headers.append(_header_line(f"secret {name}", line.strip()))
    ca_pems: tuple[str, ...] = ()
    cm_name = src.get("certConfigMap")
    if cm_name:
        cm = await _get(store, "ConfigMap", cm_name, namespace)
        ca_pems = tuple(str(v) for _, v in sorted((cm.get("data") or {}).items()))
    return HTTPTarget(str(src["url"]), username, password, tuple(headers), ca_pems,
                      bool(src.get("insecureSkipVerify")), await cronpoll.import_proxy(store),
                      last)


async def _get(store: ObjectStore, kind: str, name: str, namespace: str) -> Obj:
    try:
        return await store.get(kind, name, namespace)
    except api_errors.NotFound as e:
        raise cronpoll.PollError(f'{kind.lower()} "{name}" not found') from e


def poll(target: HTTPTarget) -> Validator:
    """The file's validator now (TARGET.last when the server answers 304).

    Blocking; raises PollError (Unpollable when the server gives no validator)
    with a reason fit for a log line, an event and a condition.
    """
    with tempfile.TemporaryDirectory(prefix="cdi-cronhttp-") as tmp:
        cert_dir = None
        if target.ca_pems:
            cert_dir = Path(tmp)
            for i, pem in enumerate(target.ca_pems):
                (cert_dir / f"ca-{i}.crt").write_text(pem)
        settings = Settings(source="http", endpoint=target.url, access_key=target.username,
                            secret_key=target.password, extra_headers=target.headers,
                            cert_dir=cert_dir, insecure_tls=target.insecure_tls,
                            stall_timeout=cronpoll.POLL_STALL_TIMEOUT,
                            http_proxy=target.proxy[0] or None,
                            https_proxy=target.proxy[1] or None,
                            no_proxy=target.proxy[2] or None)
        session = http.make_session(settings)
        try:
            return _poll(session, settings, target)
        finally:
            session.close()


def _poll(session: requests.Session, settings: Settings, target: HTTPTarget) -> Validator:
    where = http.redact(target.url)
    headers = target.last.conditional() if target.last is not None else {}
    status, reason, found = _ask(session, settings, "HEAD", headers)
    if status in HEAD_REFUSED:
        log.info("POLL url=%s HEAD status=%d, asking with GET", where, status)
        status, reason, found = _ask(session, settings, "GET", headers)
    if status == 304 and target.last is not None:
        log.info("POLL url=%s unchanged (304) %s", where, target.last.text())
        return target.last
    if status != 200:
        raise cronpoll.PollError(f"{where}: HTTP {status} {reason}".rstrip())
    if found is None:
        raise Unpollable(f"the server gives no ETag or Last-Modified for {where}, so a new "
                         "version cannot be told from the old one; it is not polled (serve "
                         "the file with a strong ETag or a Last-Modified header)")
    log.info("POLL url=%s %s", where, found.text())
    return found


def _ask(session: requests.Session, settings: Settings, method: str,
         headers: dict[str, str]) -> tuple[int, str, Validator | None]:
    url = settings.endpoint
    try:
        r = session.request(method, url, headers=headers, stream=True, allow_redirects=True,
                            auth=http.auth_for(settings, url),
                            proxies=http.proxies_for(settings, url),
                            timeout=(http.CONNECT_TIMEOUT, settings.stall_timeout))
    except requests.RequestException as e:
        raise cronpoll.PollError(f"{method} {http.redact(url)}: {http.describe(e)}") from e
    with r:  # never read the body of a GET
        return r.status_code, r.reason or "", validator_of(r.headers)


async def poll_cron(store: ObjectStore, dic: Obj, ann: dict[str, str]) -> str:
    """Poll the cron's URL; record the validator in ANN; return the digest."""
    src = source(dic)
    if src is None:
        raise cronpoll.PollError("the template has no source.http.url")
    last = Validator.parse(ann.get(ANN_VALIDATOR, ""))
    target = await gather(store, dic["metadata"]["namespace"], src, last)
    found = await asyncio.to_thread(poll, target)
    ann[ANN_VALIDATOR] = found.text()
    return found.digest


def pin(spec: Obj, dic: Obj, digest: str) -> None:
    """Pin the import of DIGEST in SPEC (the DataVolume's, from the cron's template) to
    the version polled: ``If-Match``/``If-Unmodified-Since`` in its ``extraHeaders``.

    Only when the cron's recorded validator is the one DIGEST was made from (a digest
    set by hand imports whatever the URL serves)."""
    src = (spec.get("source") or {}).get("http")
    if not isinstance(src, dict):
        return
    found = Validator.parse(((dic.get("metadata") or {}).get("annotations") or {})
                            .get(ANN_VALIDATOR, ""))
    if found is None or found.digest != digest:
        return
    kept = [h for h in src.get("extraHeaders") or []
            if str(h).partition(":")[0].strip().lower() not in PIN_HEADERS]
    src["extraHeaders"] = [*kept, found.pin()]


def condition_message(dic: Obj, base: str, error: str | None) -> str:
    """UpToDate's NoDigest message: for an HTTP cron, with why its poll failed."""
    if error and source(dic) is not None:
        return f"{base}: {error}"
    return base

