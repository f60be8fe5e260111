"""A stand-in Kubernetes API server for the Kubernetes adapter's tests (no real one runs here).

It serves the REST semantics ``cdi.backends.kube`` relies on, over HTTPS
(trustme certificate) with a bearer token, on 127.0.0.1, from its own thread
and event loop: core paths (``/api/v1``) and group paths (``/apis/<group>/
<version>``), namespaced and cluster-scoped; a global resourceVersion counter
stamped on every write; ``generateName``; 409 ``AlreadyExists`` and 409
``Conflict`` on a stale resourceVersion; status subresources (the main
resource ignores ``status``, ``/status`` writes only it, create drops it);
JSON merge patch; finalizers; lists with ``labelSelector``, ``limit`` and
``continue``; watches from a resourceVersion with ADDED/MODIFIED/DELETED,
BOOKMARK when asked, and ERROR 410 for a version older than the history
(``compact()``).  Tests steer it: ``drop_watches()`` cuts every watch
connection, ``bookmark()`` sends bookmarks, ``faults`` fails the next requests,
``on_request`` sees each request first, ``requests`` records what came in.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import json
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trustme
from aiohttp import web

from cdi.api.kinds import KINDS, Kind
from cdi.backends import kube_config
from cdi.backends.embedded import selectors
from cdi.backends.embedded.mergepatch import merge_patch
from cdi.backends.kube import EXTRA_KINDS, STATUS_SUBRESOURCE

T = TypeVar("T")
Obj = dict[str, Any]
ALL_KINDS: tuple[Kind, ...] = (*KINDS, *EXTRA_KINDS.values())


@dataclasses.dataclass(eq=False)
class _Watcher:
    kind: str
    namespace: str
    selector: selectors.Selector
    bookmarks: bool
    queue: asyncio.Queue[Obj | None]


def _status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


class FakeKube:
    def __init__(self, *, token: str = "fake-token",  # noqa: S107
                 namespace: str = "cdi") -> None:
        self.token = token
        self.namespace = namespace
        self.ca = trustme.CA()
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[tuple[int, str, Obj]] = []
        self.floor = 0  # watches from a version below this get 410
        self.rv = 100
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.errors: list[str] = []
        self.refuse_watches = False  # answer watches 503, as an overloaded server would
        self.faults: list[int] = []  # the next requests are answered with these codes
        self.on_request: Callable[[str, str, dict[str, str]], None] | None = None
        # Answers SubjectAccessReviews (spec -> status); they are not stored, as on a cluster.
        self.access_review: Callable[[Obj], Obj] | None = None
        # Refuses a create with 422 Invalid and the message it returns (None: accept), as
        # an API server does a field it does not know or an admission policy would.
        self.refuse_create: Callable[[Obj], str | None] | None = None
        self._watchers: set[_Watcher] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fakekube",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeKube:
        self._thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        for w in self._watchers:
            w.queue.put_nowait(None)
        assert self._runner is not None
        await self._runner.cleanup()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a function or a coroutine function) on the server's loop."""
        async def run() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def config(self, token: str | None = None) -> kube_config.Config:
        return kube_config.Config(server=self.url, ca_pem=self.ca.cert_pem.bytes().decode(),
                                  token=token or self.token, namespace=self.namespace)

    def kubeconfig(self, path: Path) -> Path:
        ca = base64.b64encode(self.ca.cert_pem.bytes()).decode()
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url,
                                                      "certificate-authority-data": ca}}],
            "users": [{"name": "me", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me",
                                                      "namespace": self.namespace}}]}))
        return path

    # -- steering (from the test's thread) --------------------------------------------

    def compact(self) -> None:
        """Forget the watch history: older versions now answer 410 Gone."""
        def do() -> None:
            self.history.clear()
            self.floor = self.rv
        self.call(do)

    def drop_watches(self) -> int:
        """Cut every watch connection, as a restarting API server or proxy would."""
        def do() -> int:
            n = len(self._watchers)
            for w in self._watchers:
                w.queue.put_nowait(None)
            return n
        return int(self.call(do))

    def bookmark(self) -> int:
        """Send a BOOKMARK with the current version to watches that asked for them."""
        def do() -> int:
            n = 0
            for w in self._watchers:
                if w.bookmarks:
                    w.queue.put_nowait({"type": "BOOKMARK", "object": {
                        "kind": w.kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(self.rv)}}})
                    n += 1
            return n
        return int(self.call(do))

    def watchers(self) -> int:
        return int(self.call(lambda: len(self._watchers)))

    def get(self, kind: str, name: str, namespace: str = "") -> Obj | None:
        found = self.call(lambda: self.objects.get((kind, namespace, name)))
        return copy.deepcopy(found) if found is not None else None

    def put(self, obj: Obj) -> Obj:
        """Create an object directly (as another client would)."""
        kind = next(k for k in ALL_KINDS if k.kind == obj["kind"])
        ns = obj["metadata"].get("namespace", "")
        return dict(self.call(lambda: self._create(kind, ns, copy.deepcopy(obj))))

    def patch(self, kind: str, name: str, namespace: str, patch: Obj, *,
              status: bool = False) -> Obj:
        """Merge-patch an object (its status subresource if ``status``) directly, as
        another client would (the kubelet, a CSI provisioner)."""
        k = next(k for k in ALL_KINDS if k.kind == kind)
        sub = "status" if status else ""
        return dict(self.call(lambda: self._update(k, namespace, name, patch, sub, merge=True)))

    def remove(self, kind: str, name: str, namespace: str = "") -> None:
        k = next(k for k in ALL_KINDS if k.kind == kind)
        self.call(lambda: self._delete(k, namespace, name))

    # -- request handling ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if self.on_request is not None:
            self.on_request(request.method, request.path, dict(request.query))
        if self.faults:
            code = self.faults.pop(0)
            return _status(code, "InternalError" if code >= 500 else "TooManyRequests",
                           f"injected fault {code}")
        parsed = self._route(request.path)
        if parsed is None:
            return _status(404, "NotFound", f"the server could not find {request.path}")
        kind, ns, name, sub = parsed
        body: Any = None
        if request.method in ("POST", "PUT", "PATCH") and request.can_read_body:
            try:
                body = await request.json(loads=json.loads)
            except ValueError:
                return _status(400, "BadRequest", "the body is not JSON")
        try:
            return await self._dispatch(request, kind, ns, name, sub, body)
        except _Fail as f:
            return f.response
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # a bug in the fake: the fixture fails the test
            self.errors.append(f"{request.method} {request.path}: {e!r}")
            raise

    def _route(self, path: str) -> tuple[Kind, str, str, str] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        for k in ALL_KINDS:
            if (k.group, k.version, k.plural) == (group, version, rest[0]):
                if k.namespaced != bool(ns) and len(rest) > 1:
                    return None
                return k, ns, rest[1] if len(rest) > 1 else "", \
                    rest[2] if len(rest) > 2 else ""
        return None

    async def _dispatch(self, request: web.Request, kind: Kind, ns: str, name: str,
                        sub: str, body: Any) -> web.StreamResponse:
        method = request.method
        if not name:
            if method == "GET" and request.query.get("watch") in ("1", "true"):
                return await self._watch(request, kind, ns)
            if method == "GET":
                return web.json_response(self._list(kind, ns, request.query))
            if method == "POST" and kind.kind == "SubjectAccessReview":
                if self.access_review is None or not isinstance(body, dict):
                    return _status(403, "Forbidden", "no access review answerer")
                return web.json_response({**body, "status": self.access_review(
                    body.get("spec") or {})}, status=201)
            if method == "POST":
                return web.json_response(self._create(kind, ns, body), status=201)
            return _status(405, "MethodNotAllowed", f"{method} on a collection")
        if sub not in ("", "status") or (sub and kind.kind not in STATUS_SUBRESOURCE):
            return _status(404, "NotFound", f"no subresource {sub}")
        if method == "GET":
            return web.json_response(self._stored(kind, ns, name))
        if method == "PUT":
            return web.json_response(self._update(kind, ns, name, body, sub, merge=False))
        if method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                return _status(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format: "
                               f"{request.content_type}")
            return web.json_response(self._update(kind, ns, name, body, sub, merge=True))
        if method == "DELETE":
            return web.json_response(self._delete(kind, ns, name))
        return _status(405, "MethodNotAllowed", method)

    # -- semantics -------------------------------------------------------------------------

    def _stored(self, kind: Kind, ns: str, name: str) -> Obj:
        obj = self.objects.get((kind.kind, ns, name))
        if obj is None:
            raise _Fail(_status(404, "NotFound", f'{kind.plural} "{name}" not found',
                                name=name, kind=kind.plural))
        return obj

    def _record(self, type_: str, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, type_, copy.deepcopy(obj)))
        for w in self._watchers:
            if self._wants(w, obj):
                w.queue.put_nowait({"type": type_, "object": copy.deepcopy(obj)})

    @staticmethod
    def _wants(w: _Watcher, obj: Obj) -> bool:
        meta = obj["metadata"]
        return (obj["kind"] == w.kind and (not w.namespace or meta.get("namespace") == w.namespace)
                and w.selector.matches(meta.get("labels")))

    def _create(self, kind: Kind, ns: str, body: Any) -> Obj:
        if not isinstance(body, dict) or body.get("kind") != kind.kind:
            raise _Fail(_status(400, "BadRequest", f"the body is not a {kind.kind}"))
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            raise _Fail(_status(400, "BadRequest", "the namespace of the object does not "
                                                   "match the namespace on the request"))
        if kind.kind == "Event":
            self._validate_event(body, ns)
        if self.refuse_create is not None and (why := self.refuse_create(body)) is not None:
            raise _Fail(_status(422, "Invalid", why))
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise _Fail(_status(422, "Invalid", f"{kind.kind} is invalid: metadata.name: "
                                "Required value: name or generateName is required"))
        if (kind.kind, ns, name) in self.objects:
            raise _Fail(_status(409, "AlreadyExists", f'{kind.plural} "{name}" already exists',
                                name=name, kind=kind.plural))
        meta.update(name=name, uid=str(uuid.uuid4()), generation=1,
                    creationTimestamp=_now())
        if ns:
            meta["namespace"] = ns
        if kind.kind in STATUS_SUBRESOURCE:
            body.pop("status", None)
        body["apiVersion"] = kind.api_version
        self.objects[(kind.kind, ns, name)] = body
        self._record("ADDED", body)
        return body

    @staticmethod
    def _validate_event(event: Obj, ns: str) -> None:
        """core/v1 Event's namespace rule (what the API server's validation checks)."""
        involved = (event.get("involvedObject") or {}).get("namespace") or ""
        if (involved and involved != ns) or (not involved and ns not in ("", "default")):
            raise _Fail(_status(422, "Invalid", "Event is invalid: involvedObject.namespace: "
                                "Invalid value: does not match event.namespace"))

    def _update(self, kind: Kind, ns: str, name: str, body: Any, sub: str, *,
                merge: bool) -> Obj:
        stored = self._stored(kind, ns, name)
        if not isinstance(body, dict):
            raise _Fail(_status(400, "BadRequest", "the body is not an object"))
        new = merge_patch(stored, body) if merge else copy.deepcopy(body)
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if not merge and not rv:
            raise _Fail(_status(422, "Invalid", f"{kind.kind} is invalid: metadata."
                                "resourceVersion: Invalid value: 0: must be specified for an "
                                "update"))
        if rv and rv != stored["metadata"]["resourceVersion"]:
            raise _Fail(_status(409, "Conflict", f'Operation cannot be fulfilled on '
                                f'{kind.plural} "{name}": the object has been modified; '
                                "please apply your changes to the latest version and try "
                                "again", name=name, kind=kind.plural))
        if kind.kind in STATUS_SUBRESOURCE:
            if sub == "status":  # only the status changes
                new = dict(copy.deepcopy(stored), status=new.get("status"))
                if new["status"] is None:
                    new.pop("status")
            elif "status" in stored:
                new["status"] = copy.deepcopy(stored["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "deletionTimestamp", "namespace", "name"):
            if field in stored["metadata"]:
                meta[field] = stored["metadata"][field]
        meta["generation"] = stored["metadata"]["generation"] + (
            1 if new.get("spec") != stored.get("spec") else 0)
        meta["resourceVersion"] = stored["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if new == stored:
            return stored
        if "deletionTimestamp" in meta and not meta.get("finalizers"):
            del self.objects[(kind.kind, ns, name)]
            self._record("DELETED", new)
            return new
        self.objects[(kind.kind, ns, name)] = new
        self._record("MODIFIED", new)
        return new

    def _delete(self, kind: Kind, ns: str, name: str) -> Obj:
        stored = self._stored(kind, ns, name)
        if stored["metadata"].get("finalizers"):
            if "deletionTimestamp" not in stored["metadata"]:
                stored["metadata"]["deletionTimestamp"] = _now()
                self._record("MODIFIED", stored)
            return stored
        del self.objects[(kind.kind, ns, name)]
        self._record("DELETED", stored)
        if kind.group == "cdi.kubevirt.io":  # custom resources answer with a Status
            return {"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "details": {"name": name, "kind": kind.plural,
                                                     "uid": stored["metadata"]["uid"]}}
        return stored

    def _list(self, kind: Kind, ns: str, query: Any) -> Obj:
        selector = selectors.parse(query.get("labelSelector"))
        offset, rv = 0, str(self.rv)
        if query.get("continue"):
            offset_text, _, rv = base64.b64decode(query["continue"]).decode().partition(":")
            offset = int(offset_text)
            if int(rv) < self.floor:
                raise _Fail(_status(410, "Expired", "The provided continue parameter is too "
                                    "old to display a consistent list result."))
        items = [copy.deepcopy(o) for (kd, ons, _), o in sorted(self.objects.items())
                 if kd == kind.kind and (not ns or ons == ns)
                 and selector.matches(o["metadata"].get("labels"))
                 and int(o["metadata"]["resourceVersion"]) <= int(rv)]
        limit = int(query.get("limit") or 0)
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: Obj = {"resourceVersion": rv}
        if limit and offset + limit < len(items):
            meta["continue"] = base64.b64encode(f"{offset + limit}:{rv}".encode()).decode()
        for o in page:
            if kind.group != "cdi.kubevirt.io":  # built-in lists carry no kind per item
                o.pop("kind", None)
                o.pop("apiVersion", None)
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": meta, "items": page}

    async def _watch(self, request: web.Request, kind: Kind, ns: str) -> web.StreamResponse:
        if self.refuse_watches:
            return _status(503, "ServiceUnavailable", "the server is shutting down")
        rv_text = request.query.get("resourceVersion") or str(self.rv)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        since = int(rv_text)
        if since < self.floor:
            await response.write(json.dumps({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                "reason": "Expired", "message": f"too old resource version: {since} "
                                               f"({self.floor})"}}).encode() + b"\n")
            return response
        watcher = _Watcher(kind.kind, ns, selectors.parse(request.query.get("labelSelector")),
                           request.query.get("allowWatchBookmarks") == "true",
                           asyncio.Queue())
        for rv, type_, obj in self.history:
            if rv > since and self._wants(watcher, obj):
                watcher.queue.put_nowait({"type": type_, "object": copy.deepcopy(obj)})
        self._watchers.add(watcher)
        try:
            while (event := await watcher.queue.get()) is not None:
                await response.write(json.dumps(event).encode() + b"\n")
        finally:
            self._watchers.discard(watcher)
        if request.transport is not None:
            request.transport.abort()  # a dropped connection, not a clean end
        return response


class _Fail(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
