"""``KubeStore``: the object store port on a Kubernetes API server.

The controllers run unchanged on a cluster because this adapter gives them the
port's semantics (``cdi.backends.port``) over the API server's REST API.  It
is the only module that talks to the Kubernetes API; it does so with aiohttp
directly (the port is generic, dict-shaped REST, which typed client libraries
get in the way of), with the configuration ``kube_config`` finds.

How the port maps onto the API:

- ``replace`` is ``PUT``; ``replace_status`` is ``PUT .../status`` for kinds
  with a status subresource; ``patch`` is a JSON merge patch.  The API server
  ignores ``status`` in a patch of the main resource, and the port does not,
  so a patch carrying ``status`` is split: the rest first, then the status
  through ``/status``, which keeps the caller's resourceVersion precondition
  by carrying the version the first half produced.
- Errors come back as ``Status`` objects and become ``cdi.api.errors``, as the
  embedded store raises them (409 ``AlreadyExists`` vs ``Conflict``, 410
  ``Gone``, 422 ``Invalid``, ...).  Failures to reach the server are
  ``Unavailable``.  A 401 makes the credentials re-read once (rotated token).
- ``list`` pages through the collection (``limit``/``continue``).
- ``watch`` asks for bookmarks; when the stream ends or drops it resumes from
  the last resourceVersion it saw (an event or a bookmark).  When the server
  answers 410 Gone it lists again and emits what changed in between (ADDED,
  MODIFIED, DELETED with the last object seen), so the controllers converge
  without a gap.  That needs to know the objects the watch started from: a
  watch started without a version lists them; one started from the version a
  ``list`` of the same kind just returned takes that list's objects (the
  runtime's list-then-watch).  Any other watch raises ``Gone``, as the port
  says, and its caller relists.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from cdi.api import errors
from cdi.api.kinds import Kind
from cdi.backends import kube_config
from cdi.backends.kube_objects import (
    EXTRA_KINDS,
    STATUS_SUBRESOURCE,
    ObjKey,
    changes,
    key_of,
    kind_of,
    typed,
    version_of,
)
from cdi.backends.port import EventType, Obj, ObjectList, WatchEvent

__all__ = ["EXTRA_KINDS", "STATUS_SUBRESOURCE", "KubeStore", "StoreClosed", "Unavailable",
           "error_of", "kind_of"]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
PAGE_SIZE = 500
CLOSE_GRACE = 0.1  # seconds for TLS connections to finish closing
WATCH_TIMEOUT = 300  # seconds the server keeps one watch request open
MAX_LINE = 16 * 1024 * 1024  # an object is at most ~1.5 MiB in etcd
_ERRORS: dict[int, type[errors.APIError]] = {
    400: errors.BadRequest, 401: errors.Unauthorized, 403: errors.Forbidden,
    404: errors.NotFound, 405: errors.MethodNotAllowed, 410: errors.Gone,
    415: errors.UnsupportedMediaType, 422: errors.Invalid}
_EVENT_TYPES: dict[str, EventType] = {"ADDED": "ADDED", "MODIFIED": "MODIFIED",
                                      "DELETED": "DELETED"}


class Unavailable(errors.APIError):
    """The API server could not be reached, or said it cannot answer now."""

    code = 503
    reason = "ServiceUnavailable"


class StoreClosed(RuntimeError):
    """The store is not open."""


def error_of(code: int, body: Any) -> errors.APIError:
    """The port's exception for an API ``Status`` failure."""
    status: Obj = body if isinstance(body, dict) else {}
    message = str(status.get("message") or f"HTTP {code}")[:1024]
    details: Obj = status["details"] if isinstance(status.get("details"), dict) else {}
    kw: dict[str, Any] = {"kind": str(details.get("kind", "")),
                          "name": str(details.get("name", ""))}
    if isinstance(details.get("causes"), list):
        kw["causes"] = details["causes"]
    if code == 409:
        cls: type[errors.APIError] = (errors.AlreadyExists
                                      if status.get("reason") == "AlreadyExists"
                                      else errors.Conflict)
    elif code == 429 or code >= 500:
        cls = Unavailable
    else:
        cls = _ERRORS.get(code, errors.APIError)
    return cls(message, **kw)


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history (410)."""


class KubeStore:
    """An ``ObjectStore`` on the API server ``config`` describes.

    ``async with KubeStore(config) as store``, or ``open()``/``close()``.
    """

    def __init__(self, config: kube_config.Config, *, page_size: int = PAGE_SIZE,
                 watch_timeout: int = WATCH_TIMEOUT, request_timeout: float = 30.0,
                 retry_delay: float = 1.0) -> None:
        self.config = config
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._retry_delay = retry_delay
        self._session: aiohttp.ClientSession | None = None
        self._ssl = config.ssl_context() if config.server.startswith("https:") else None
        # The objects of the latest full list per (kind, namespace, selector), so a
        # watch from that list's version can tell what a relist changed.
        self._listed: dict[tuple[str, str, str], tuple[str, dict[ObjKey, Obj]]] = {}
        self._streams: set[aiohttp.ClientResponse] = set()

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else True))
            log.info("OPEN server=%s", self.config.server)

    async def close(self) -> None:
        session, self._session = self._session, None
        for response in list(self._streams):  # ends the watches reading them
            response.close()
        if session is not None:
            await session.close()
            # TLS connections finish closing on the next turns of the loop; give them
            # those turns (aiohttp's advice for a graceful shutdown), or a loop that
            # ends right after finds their sockets still open.
            await asyncio.sleep(CLOSE_GRACE)

    async def __aenter__(self) -> KubeStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- HTTP ----------------------------------------------------------------------

    async def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "cdi-controller"}
        auth = await self.config.authorization()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: Any = None, content_type: str = "application/json") -> Obj:
        if self._session is None:
            raise StoreClosed("the store is not open")
        data = None if body is None else json.dumps(body).encode()
        attempts = 3 if method == "GET" else 1
        attempt, reauthorized = 0, False
        while True:
            attempt += 1
            try:
                async with self._session.request(
                        method, self.config.server + path, params=params, data=data,
                        headers=await self._headers(content_type if data else None),
                        server_hostname=self.config.tls_server_name,
                        timeout=aiohttp.ClientTimeout(total=self._request_timeout)) as r:
                    text = await r.text()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as e:
                if attempt < attempts:
                    await asyncio.sleep(self._retry_delay * attempt)
                    continue
                raise Unavailable(f"{method} {path}: {e}") from e
            try:
                answer = json.loads(text) if text else {}
            except ValueError:
                answer = {"message": text[:256]}
            if status == 401 and not reauthorized:
                self.config.invalidate()  # a rotated token: read it again, once
                reauthorized = True
                attempt -= 1
                continue
            if status < 400:
                if not isinstance(answer, dict):
                    raise Unavailable(f"{method} {path}: the answer is not an object")
                return answer
            if status in (429, 500, 502, 503, 504) and attempt < attempts:
                await asyncio.sleep(self._retry_delay * attempt)
                continue
            raise error_of(status, answer)

    @staticmethod
    def _path(kind: Kind, namespace: str | None, name: str | None = None,
              sub: str = "") -> str:
        if kind.namespaced and name is not None and not namespace:
            raise errors.BadRequest(f"namespace is required for {kind.kind}")
        path = kind.path(namespace or None, name)
        return f"{path}/{sub}" if sub else path

    # -- reads -----------------------------------------------------------------------

    async def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        k = kind_of(kind)
        return typed(k, await self._request("GET", self._path(k, namespace, name)))

    async def list(self, kind: str, namespace: str | None = None, *,
                   label_selector: str | None = None) -> ObjectList:
        k = kind_of(kind)
        ns = namespace if k.namespaced and namespace else ""
        items, rv = await self._list_all(k, ns, label_selector)
        self._listed[(k.kind, ns, label_selector or "")] = (
            rv, {key_of(o): o for o in items})
        return ObjectList(items, rv)

    async def _list_all(self, k: Kind, ns: str, selector: str | None, *,
                        limit: int | None = None) -> tuple[builtins.list[Obj], str]:
        for _ in range(3):
            items: builtins.list[Obj] = []
            params = {"limit": str(limit or self._page_size)}
            if selector:
                params["labelSelector"] = selector
            rv = ""
            try:
                while True:
                    page = await self._request("GET", self._path(k, ns), params=params)
                    meta = page.get("metadata") or {}
                    rv = rv or str(meta.get("resourceVersion", ""))
                    items.extend(typed(k, o) for o in page.get("items") or ())
                    token = meta.get("continue")
                    if not token or limit:
                        return items, rv
                    params["continue"] = str(token)
            except errors.Gone:  # the continue token expired: start over
                log.info("LIST %s continue token expired, listing again", k.kind)
        raise Unavailable(f"listing {k.kind}: continue tokens keep expiring")

    # -- writes ----------------------------------------------------------------------

    async def create(self, obj: Obj) -> Obj:
        k = kind_of(obj.get("kind"))
        ns = (obj.get("metadata") or {}).get("namespace")
        if k.namespaced and not ns:
            raise errors.BadRequest(f"namespace is required for {k.kind}")
        body = {"apiVersion": k.api_version, **obj}
        created = typed(k, await self._request("POST", self._path(k, ns), body=body))
        if k.kind in STATUS_SUBRESOURCE and obj.get("status") and \
                created.get("status") != obj["status"]:
            # The server drops status on create; the port keeps it.
            created["status"] = obj["status"]
            return await self.replace_status(created)
        return created

    async def replace(self, obj: Obj) -> Obj:
        k, ns, name = self._target(obj)
        return typed(k, await self._request("PUT", self._path(k, ns, name), body=obj))

    async def replace_status(self, obj: Obj) -> Obj:
        k, ns, name = self._target(obj)
        sub = "status" if k.kind in STATUS_SUBRESOURCE else ""
        return typed(k, await self._request("PUT", self._path(k, ns, name, sub), body=obj))

    async def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        k = kind_of(kind)
        if not isinstance(patch, dict):
            raise errors.BadRequest("a merge patch must be a JSON object")
        path = self._path(k, namespace, name)
        if k.kind not in STATUS_SUBRESOURCE or "status" not in patch:
            return typed(k, await self._request("PATCH", path, body=patch,
                                                 content_type=MERGE_PATCH))
        rest = {f: v for f, v in patch.items() if f != "status"}
        meta: Obj = rest["metadata"] if isinstance(rest.get("metadata"), dict) else {}
        precondition = meta.get("resourceVersion")
        only_precondition = set(rest) <= {"metadata"} and set(meta) <= {"resourceVersion"}
        status_patch: Obj = {"status": patch["status"]}
        if not only_precondition:
            done = await self._request("PATCH", path, body=rest, content_type=MERGE_PATCH)
            if precondition is not None:
                precondition = version_of(done)
        if precondition is not None:
            status_patch["metadata"] = {"resourceVersion": precondition}
        return typed(k, await self._request("PATCH", f"{path}/status", body=status_patch,
                                             content_type=MERGE_PATCH))

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        k = kind_of(kind)
        options = {"apiVersion": "v1", "kind": "DeleteOptions",
                   "propagationPolicy": "Background"}
        answer = await self._request("DELETE", self._path(k, namespace, name), body=options)
        if answer.get("kind") == "Status":  # deleted at once; some kinds answer so
            details = answer.get("details") or {}
            meta: Obj = {"name": name, "uid": details.get("uid", "")}
            if k.namespaced:
                meta["namespace"] = namespace
            return {"apiVersion": k.api_version, "kind": k.kind, "metadata": meta}
        return typed(k, answer)

    def _target(self, obj: Obj) -> tuple[Kind, str | None, str]:
        k = kind_of(obj.get("kind"))
        meta = obj.get("metadata") or {}
        if not meta.get("name"):
            raise errors.BadRequest("metadata.name: Required value: name is required")
        return k, meta.get("namespace"), str(meta["name"])

    # -- watch -----------------------------------------------------------------------

    def watch(self, kind: str, namespace: str | None = None, *,
              resource_version: str | None = None,
              label_selector: str | None = None) -> AsyncIterator[WatchEvent]:
        """Events of ``kind`` after ``resource_version`` (after now if None), for as
        long as the store is open; see the module docstring for resumes and 410."""
        if self._session is None:
            raise StoreClosed("the store is not open")
        k = kind_of(kind)
        ns = namespace if k.namespaced and namespace else ""
        return self._watch(k, ns, resource_version or None, label_selector)

    async def _watch(self, k: Kind, ns: str, rv: str | None,
                     selector: str | None) -> AsyncIterator[WatchEvent]:
        known: dict[ObjKey, Obj] | None = None
        if rv is None:
            items, rv = await self._list_all(k, ns, selector)
            known = {key_of(o): o for o in items}
        else:
            listed = self._listed.get((k.kind, ns, selector or ""))
            if listed is not None and listed[0] == rv:
                known = dict(listed[1])
        failures = 0
        while self._session is not None:
            try:
                received = False
                async for type_, obj in self._stream(k, ns, rv, selector):
                    failures, received = 0, True
                    rv = version_of(obj) or rv
                    if type_ not in ("ADDED", "MODIFIED", "DELETED"):
                        continue  # a bookmark: only its resourceVersion matters
                    if known is not None:
                        if type_ == "DELETED":
                            known.pop(key_of(obj), None)
                        else:
                            known[key_of(obj)] = obj
                    yield WatchEvent(_EVENT_TYPES[type_], obj)
                if not received:  # ended at once: do not spin on a server that does so
                    await asyncio.sleep(self._retry_delay)
            except _Expired:
                if known is None:
                    raise errors.Gone(f"watch of {k.kind}: resourceVersion {rv} is too old "
                                      "and there is no list to compare with") from None
                log.info("WATCH %s resourceVersion=%s expired, listing again", k.kind, rv)
                items, rv = await self._list_all(k, ns, selector)
                for event in changes(known, items):
                    yield event
                known = {key_of(o): o for o in items}
            except (aiohttp.ClientError, TimeoutError, Unavailable) as e:
                if self._session is None:
                    return
                failures += 1
                delay = min(self._retry_delay * 2 ** (failures - 1), 30.0)
                log.info("WATCH %s dropped (%s), resuming from %s in %.1fs", k.kind,
                         type(e).__name__, rv, delay)
                await asyncio.sleep(delay)

    async def _stream(self, k: Kind, ns: str, rv: str, selector: str | None
                      ) -> AsyncIterator[tuple[EventType | str, Obj]]:
        if self._session is None:
            return
        params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self._watch_timeout)}
        if selector:
            params["labelSelector"] = selector
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._request_timeout,
                                        sock_read=self._watch_timeout + 30)
        async with self._session.get(self.config.server + self._path(k, ns or None),
                                     params=params, headers=await self._headers(None),
                                     server_hostname=self.config.tls_server_name,
                                     timeout=timeout) as r:
            if r.status == 410:
                raise _Expired()
            if r.status >= 400:
                text = await r.text()
                if r.status == 401:
                    self.config.invalidate()
                    raise Unavailable(f"watch of {k.kind}: unauthorized, retrying")
                try:
                    body = json.loads(text)
                except ValueError:
                    body = {"message": text[:256]}
                raise error_of(r.status, body)
            self._streams.add(r)
            try:
                async for event in self._events(k, r):
                    yield event
            finally:
                self._streams.discard(r)

    async def _events(self, k: Kind, r: aiohttp.ClientResponse
                      ) -> AsyncIterator[tuple[EventType | str, Obj]]:
        buffer = bytearray()
        async for chunk in r.content.iter_any():
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                if line.strip():
                    yield _event(k, line)
            if len(buffer) > MAX_LINE:
                raise Unavailable(f"watch of {k.kind}: an event over {MAX_LINE} bytes")
        if buffer.strip():
            yield _event(k, bytes(buffer))


def _event(k: Kind, line: bytes) -> tuple[EventType | str, Obj]:
    try:
        event = json.loads(line)
        type_, obj = event["type"], event["object"]
    except (ValueError, KeyError, TypeError) as e:
        raise Unavailable(f"watch of {k.kind}: not a watch event: {line[:256]!r}") from e
    if type_ == "ERROR":
        code = obj.get("code", 500) if isinstance(obj, dict) else 500
        if code == 410:
            raise _Expired()
        raise error_of(int(code), obj)
    if type_ not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise Unavailable(f"watch of {k.kind}: unknown event type {type_!r}")
    return type_, obj if type_ == "BOOKMARK" else typed(k, obj)

