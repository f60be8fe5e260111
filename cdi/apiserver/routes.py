"""The resource handlers: Kubernetes verbs on the object store, with admission.

Every ``/api/...`` and ``/apis/...`` request comes to :func:`resource`, which
resolves the path (``paths.resolve``) and picks the handler by the shape of the
target (collection, object, ``/status``, ``/log``) and the HTTP method.

Writes check the body against the path the way Kubernetes does: a missing
``apiVersion``/``kind``/``metadata.namespace``/``metadata.name`` is filled from
the path, a different one is a 400.  Creates, replaces and patches of the main
resource pass through admission before anything is written: first the
``user_admit(new, old, AdmissionRequest)`` hook, which knows who asks (CDI's
clone-source authorization, RBAC's escalation check: ``cdi.apiserver.admission``),
as mutating webhooks see ``request.userInfo``; then ``admit(new, old)``
(validation, 422 when it raises ``Invalid``).  ``/status`` writes skip both, as
they skip webhooks in Kubernetes.  Authorization of the request itself happened
before any handler runs (``cdi.apiserver.rbac.middleware``).

PATCH is read-modify-write here rather than ``store.patch``, so admission sees
the object as it would be written: get, apply the merge patch, admit, then
``store.replace`` (or ``replace_status``) carrying the resourceVersion that was
read, so a concurrent write makes the store answer Conflict.  A patch that does
not pin ``metadata.resourceVersion`` itself is then retried on the fresh object
(Kubernetes also retries such patches); one that pins it gets the 409.  As in
Kubernetes, a ``status`` in a patch of the main resource is ignored
(``replace`` keeps the stored status); patch ``/status`` to change it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from cdi.api import errors
from cdi.apiserver import admission, auth, codec, discovery, paths, rbac, watch
from cdi.apiserver.paths import GroupVersion, Target
from cdi.apiserver.query import ListQuery
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

Admit = Callable[[Obj, Obj | None], None]
# Admission that needs the requester: ``user_admit(new, old, request)``.
UserAdmit = Callable[[Obj, Obj | None, admission.AdmissionRequest], None]
PodLogs = Callable[[str, str], Path | None]
# Kinds whose create is answered, not stored (UploadTokenRequest): kind -> handler.
Creator = Callable[[Obj], Awaitable[Obj]]
Handler = Callable[[web.Request, Target], Awaitable[web.StreamResponse]]

STORE: web.AppKey[ObjectStore] = web.AppKey("store")
ADMIT: web.AppKey[Admit | None] = web.AppKey("admit")
USER_ADMIT: web.AppKey[UserAdmit | None] = web.AppKey("user_admit")
POD_LOGS: web.AppKey[PodLogs | None] = web.AppKey("pod_logs")
CREATORS: web.AppKey[dict[str, Creator]] = web.AppKey("creators")
WATCHES = web.AppKey("watches", watch.WatchRegistry)

PATCH_ATTEMPTS = 5
NOT_ALLOWED = "the server does not allow this method on the requested resource"


async def resource(request: web.Request) -> web.StreamResponse:
    """Every request under ``/api/`` and ``/apis/``."""
    found = paths.resolve(request.path)
    if isinstance(found, GroupVersion):
        if request.method not in ("GET", "HEAD"):
            raise errors.MethodNotAllowed(NOT_ALLOWED)
        return web.json_response(discovery.resource_list(found))
    handler = _HANDLERS.get((_shape(found), request.method))
    if handler is None:
        raise errors.MethodNotAllowed(NOT_ALLOWED)
    return await handler(request, found)


def _shape(t: Target) -> str:
    if t.subresource is not None:
        return t.subresource
    if t.name is not None:
        return "object"
    if t.kind.namespaced and t.namespace is None:
        return "all-namespaces"
    return "collection"


async def _list(request: web.Request, t: Target) -> web.StreamResponse:
    store = request.app[STORE]
    query = ListQuery.parse(request.query)
    if query.watch:
        return await watch.serve(request, store, t, query, request.app[WATCHES])
    result = await store.list(t.kind.kind, t.namespace, label_selector=query.label_selector)
    return web.json_response({
        "apiVersion": t.kind.api_version,
        "kind": f"{t.kind.kind}List",
        "metadata": {"resourceVersion": result.resource_version},
        "items": [obj for obj in result.items if query.matches(obj)],
    })


async def _get(request: web.Request, t: Target) -> web.StreamResponse:
    assert t.name is not None
    obj = await request.app[STORE].get(t.kind.kind, t.name, t.namespace)
    return web.json_response(obj)


async def _create(request: web.Request, t: Target) -> web.StreamResponse:
    obj = await _read_object(request)
    _fit(obj, t)
    await _admit(request, obj, None)
    creator = request.app[CREATORS].get(t.kind.kind)
    if creator is not None:
        return web.json_response(await creator(obj), status=201)
    created = await request.app[STORE].create(obj)
    _log_write("CREATE", created)
    return web.json_response(created, status=201)


async def _replace(request: web.Request, t: Target) -> web.StreamResponse:
    assert t.name is not None
    obj = await _read_object(request)
    _fit(obj, t)
    store = request.app[STORE]
    if t.subresource == "status":
        written = await store.replace_status(obj)
    else:
        old = await store.get(t.kind.kind, t.name, t.namespace)
        await _admit(request, obj, old)
        written = await store.replace(obj)
    _log_write("REPLACE", written, t.subresource)
    return web.json_response(written)


async def _patch(request: web.Request, t: Target) -> web.StreamResponse:
    assert t.name is not None
    patch = codec.decode_patch(await request.read(), request.content_type)
    pinned = "resourceVersion" in (patch.get("metadata") or {})
    store = request.app[STORE]
    attempt = 0
    while True:
        attempt += 1
        current = await store.get(t.kind.kind, t.name, t.namespace)
        new = codec.merge_patch(current, patch)
        _fit(new, t)
        try:
            if t.subresource == "status":
                written = await store.replace_status(new)
            else:
                await _admit(request, new, current)
                written = await store.replace(new)
        except errors.Conflict:
            if pinned or attempt >= PATCH_ATTEMPTS:
                raise
            log.info("PATCH conflict, retrying kind=%s namespace=%s name=%s attempt=%d",
                     t.kind.kind, t.namespace, t.name, attempt)
            continue
        _log_write("PATCH", written, t.subresource)
        return web.json_response(written)


async def _delete(request: web.Request, t: Target) -> web.StreamResponse:
    assert t.name is not None
    obj = await request.app[STORE].delete(t.kind.kind, t.name, t.namespace)
    if not obj:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success",
                                  "details": {"name": t.name, "kind": t.kind.plural}})
    _log_write("DELETE", obj)
    return web.json_response(obj)


async def _log(request: web.Request, t: Target) -> web.StreamResponse:
    """``GET .../pods/{name}/log``: the pod's log file, as text.

    Served whether or not the pod object still exists, so the log of a
    finished importer can be read after its pod is gone.
    """
    assert t.name is not None and t.namespace is not None
    pod_logs = request.app[POD_LOGS]
    path = pod_logs(t.namespace, t.name) if pod_logs is not None else None
    loop = asyncio.get_running_loop()
    if path is None or not await loop.run_in_executor(None, path.is_file):
        raise errors.NotFound(f'no log for pod "{t.name}" in namespace "{t.namespace}"',
                              kind="pods", name=t.name)
    return web.FileResponse(path, headers={"Content-Type": "text/plain; charset=utf-8"})


async def _read_object(request: web.Request) -> Obj:
    return codec.decode_object(await request.read(), request.content_type)


def _fit(obj: Obj, t: Target) -> None:
    """Fill OBJ's type, namespace and name from the path; 400 if they differ."""
    kind = t.kind
    api_version = obj.setdefault("apiVersion", kind.api_version)
    if api_version != kind.api_version:
        raise errors.BadRequest(f"the API version in the data ({api_version}) does not match "
                                f"the expected API version ({kind.api_version})")
    if obj.setdefault("kind", kind.kind) != kind.kind:
        raise errors.BadRequest(f"the kind in the data ({obj['kind']}) does not match the "
                                f"expected kind ({kind.kind})")
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise errors.BadRequest("metadata must be an object")
    if kind.namespaced:
        if not meta.get("namespace"):
            meta["namespace"] = t.namespace
        elif meta["namespace"] != t.namespace:
            raise errors.BadRequest("the namespace of the provided object does not match the "
                                    "namespace sent on the request")
    else:
        meta.pop("namespace", None)
    if t.name is not None:
        if not meta.get("name"):
            meta["name"] = t.name
        elif meta["name"] != t.name:
            raise errors.BadRequest(f"the name of the object ({meta['name']}) does not match "
                                    f"the name on the URL ({t.name})")


async def _admit(request: web.Request, new: Obj, old: Obj | None) -> None:
    user_admit = request.app.get(USER_ADMIT)
    if user_admit is not None:
        user_admit(new, old, admission.AdmissionRequest(
            auth.user_of(request), rbac.policy_of(request),
            clone_source=await admission.clone_source_of(request.app[STORE], new)))
    admit = request.app[ADMIT]
    if admit is not None:
        admit(new, old)


def _log_write(verb: str, obj: Obj, subresource: str | None = None) -> None:
    meta = obj.get("metadata") or {}
    log.info("%s kind=%s namespace=%s name=%s subresource=%s resourceVersion=%s", verb,
             obj.get("kind"), meta.get("namespace"), meta.get("name"), subresource,
             meta.get("resourceVersion"))


_HANDLERS: dict[tuple[str, str], Handler] = {
    ("collection", "GET"): _list,
    ("collection", "POST"): _create,
    ("all-namespaces", "GET"): _list,
    ("object", "GET"): _get,
    ("object", "PUT"): _replace,
    ("object", "PATCH"): _patch,
    ("object", "DELETE"): _delete,
    ("status", "GET"): _get,
    ("status", "PUT"): _replace,
    ("status", "PATCH"): _patch,
    ("log", "GET"): _log,
}
