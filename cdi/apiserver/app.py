"""The aiohttp application of the REST API: routes, auth, RBAC and the one error mapper.

``cdi serve`` builds the store, the controllers and this app, and runs it.  The
app holds no state of its own beyond the open watches; everything else is in
the store, so any number of clients (the CLI, controllers in another process,
``kubectl``) see the same objects.

Every request passes authentication (``auth.middleware``: the admin token or
a registered one; 401 otherwise), then authorization (``rbac.middleware``:
Kubernetes RBAC for anyone outside ``system:masters``; 403 with
kube-apiserver's message otherwise).  ``/auth/v1/tokens`` manages the
registered tokens, for ``system:masters`` only.

Errors are mapped in one place, :func:`error_middleware`: an ``APIError`` is
its Kubernetes ``Status`` with its code (logged at warning, no traceback);
aiohttp's own HTTP errors (no route, body too large) become a ``Status`` too;
anything else is logged with its traceback and answered with a 500 ``Status``
that says nothing about it.
"""

from __future__ import annotations

import http
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from cdi.api import errors
from cdi.apiserver import admission, auth, discovery, metrics, openapi, rbac, routes, watch
from cdi.apiserver.routes import Admit, PodLogs, UserAdmit
from cdi.backends.port import ObjectStore

log = logging.getLogger(__name__)

INTERNAL = "Internal error, see the server log"
LOGGED_MESSAGE_MAX = 256
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")


def create_app(store: ObjectStore, *, token: str, admit: Admit | None = None,
               pod_logs: PodLogs | None = None,
               creators: dict[str, routes.Creator] | None = None,
               tokens: auth.TokenRegistry | None = None,
               user_admit: UserAdmit | None = admission.admit) -> web.Application:
    """The API server app over STORE.

    TOKEN is the admin's bearer token (``system:admin``, ``system:masters``);
    TOKENS, if given, holds the other identities' tokens and is served at
    ``/auth/v1/tokens``.  Every request but ``GET /healthz`` must carry one.
    USER_ADMIT, then ADMIT, are called as ``user_admit(new, old, request)`` and
    ``admit(new, old)`` before an object is created (``old`` None), replaced or
    patched; they may raise ``Invalid`` or ``Forbidden``.
    POD_LOGS maps ``(namespace, pod name)`` to the pod's log file for
    ``GET .../pods/{name}/log``.  CREATORS answers creates of kinds that are
    not stored (``UploadTokenRequest``: the answer carries the token).
    """
    app = web.Application(middlewares=[error_middleware, auth.middleware(token, tokens),
                                       rbac.middleware(store)])
    app[routes.STORE] = store
    app[routes.ADMIT] = admit
    app[routes.USER_ADMIT] = user_admit
    if tokens is not None:
        auth.add_routes(app, tokens)
    app[routes.POD_LOGS] = pod_logs
    app[routes.CREATORS] = creators or {}
    app[routes.WATCHES] = watch.WatchRegistry()
    app[OPENAPI] = openapi.document()
    # on_shutdown, not cleanup_ctx: aiohttp waits for running handlers (up to
    # its shutdown timeout) after on_shutdown and before cleanup, so open
    # watches must be ended here or they hold the shutdown up.
    app.on_shutdown.append(_stop_watches)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", metrics.handler(store))
    app.router.add_get("/version", _json(discovery.version))
    app.router.add_get("/api", _json(discovery.core_versions))
    app.router.add_get("/apis", _json(discovery.group_list))
    app.router.add_get("/apis/{group}", _api_group)
    app.router.add_get("/openapi/v3", _openapi)
    app.router.add_route("*", "/api/{tail:.+}", routes.resource)
    app.router.add_route("*", "/apis/{tail:.+}", routes.resource)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become responses."""
    try:
        return await handler(request)
    except errors.APIError as e:
        if e.code >= 500:
            log.exception("Server error: %s %s", request.method, request.path)
        else:
            _log_client_error(request, e.code, e.reason, e.message)
        return web.json_response(e.status(), status=e.code)
    except web.HTTPException as e:
        if e.status_code < 400:
            raise
        reason = http.HTTPStatus(e.status_code).phrase.replace(" ", "")
        message = _HTTP_MESSAGES.get(e.status_code, e.reason)
        _log_client_error(request, e.status_code, reason, message)
        return web.json_response(_status(e.status_code, reason, message),
                                 status=e.status_code)
    except ConnectionError:
        if watch.client_gone(request):  # nobody to answer; aiohttp closes the connection
            log.info("Client went away: %s %s", request.method, request.path)
            raise
        log.exception("Internal error: %s %s", request.method, request.path)
        return web.json_response(_status(500, "InternalError", INTERNAL), status=500)
    except Exception:
        log.exception("Internal error: %s %s", request.method, request.path)
        return web.json_response(_status(500, "InternalError", INTERNAL), status=500)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_HTTP_MESSAGES = {
    404: "the server could not find the requested resource",
    405: "the server does not allow this method on the requested resource",
    413: "the request body is too large",
}


def _log_client_error(request: web.Request, code: int, reason: str, message: str) -> None:
    log.warning("%s %s code=%d reason=%s: %s", request.method, request.path, code, reason,
                message[:LOGGED_MESSAGE_MAX])


async def _stop_watches(app: web.Application) -> None:
    await app[routes.WATCHES].stop()


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[OPENAPI])


async def _api_group(request: web.Request) -> web.StreamResponse:
    group = request.match_info["group"]
    if group not in discovery.groups():
        raise errors.NotFound(_HTTP_MESSAGES[404])
    return web.json_response(discovery.api_group(group))


def _json(document: Any) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response(document())

    return handle
