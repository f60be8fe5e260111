"""The upload proxy as an aiohttp application, for whichever process hosts it.

``cdi serve`` mounts it next to the API server; on Kubernetes a small entry
point will serve it over TLS.  Either way the host only calls
:func:`create_app` with the API server's public key and a
:class:`~uploadproxy.resolver.Resolver`; everything else lives here:

- routes: CDI's upload endpoints (``routing``), HEAD probes on the async
  ones, ``GET /healthz``, our ``GET /v1beta1/upload-offset``, CORS preflight
  for any path, and ``/metrics`` when asked;
- one ``ClientSession`` for all upstream requests, opened and closed through
  ``cleanup_ctx`` (mutual TLS when ``client_ssl`` is given);
- one error middleware, the only place a failure becomes a response:
  :class:`~uploadproxy.errors.ProxyError` becomes its status and escaped text,
  anything else a 500 that hides the details and logs the traceback;
- CORS (``Access-Control-Allow-Origin: *``, as CDI) and the response counter
  on every response, through ``on_response_prepare``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from uploadproxy import auth, errors, forward, metrics, routing, tap
from uploadproxy.resolver import Resolver

__all__ = ["CONFIG", "SESSION", "Config", "create_app"]

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = 24 * 3600.0
"""Seconds an upstream request may take; a sync upload answers after conversion (CDI: 24 h)."""

CONNECT_TIMEOUT = 10.0
"""Seconds to connect to an upload server, TLS handshake included."""

INTERNAL_ERROR = "internal error, check the upload proxy log"

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "POST, GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Length, X-Checksum",
    "Access-Control-Max-Age": "600",
}


@dataclass(frozen=True)
class Config:
    """What :func:`create_app` was given; read by the handlers through :data:`CONFIG`."""

    public_key: RSAPublicKey
    resolver: Resolver
    client_ssl: ssl.SSLContext | None
    ready_timeout: float
    ready_interval: float


CONFIG = web.AppKey("uploadproxy.config", Config)
SESSION = web.AppKey("uploadproxy.session", aiohttp.ClientSession)


def create_app(
    *,
    public_key: RSAPublicKey,
    resolver: Resolver,
    client_ssl: ssl.SSLContext | None = None,
    ready_timeout: float = 10.0,
    ready_interval: float = 1.0,
    metrics_endpoint: bool = False,
) -> web.Application:
    """The upload proxy.

    ``public_key`` verifies upload tokens; ``resolver`` finds upload servers,
    polled every ``ready_interval`` seconds for up to ``ready_timeout``;
    ``client_ssl`` is the client context for HTTPS upload servers (their CA
    and our client certificate); without it HTTPS upstreams are verified
    against the system CAs and get no client certificate.
    ``metrics_endpoint`` adds ``GET /metrics``.
    """
    if ready_timeout < 0 or ready_interval <= 0:
        raise ValueError("ready_timeout must be >= 0 and ready_interval > 0")
    app = web.Application(middlewares=[_error_middleware])
    app[CONFIG] = Config(public_key=public_key, resolver=resolver, client_ssl=client_ssl,
                         ready_timeout=ready_timeout, ready_interval=ready_interval)
    app.cleanup_ctx.append(_client_session)
    app.on_response_prepare.append(_on_response_prepare)

    for path in routing.upload_paths():
        app.router.add_post(path, _handle_upload)
    for path in routing.async_paths():
        app.router.add_route("HEAD", path, _handle_upload)
    app.router.add_get(routing.OFFSET_PATH, _handle_upload, allow_head=False)
    app.router.add_get(routing.HEALTHZ_PATH, _handle_healthz)
    if metrics_endpoint:
        app.router.add_get("/metrics", metrics.handle_metrics)
    for resource in app.router.resources():
        if isinstance(resource, web.Resource):
            resource.add_route("OPTIONS", _handle_preflight)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    client_ssl = app[CONFIG].client_ssl
    connector = aiohttp.TCPConnector(
        ssl=client_ssl if client_ssl is not None else True,
        limit=0,
        # Upload servers serve one upload and exit: a pooled connection is
        # likely dead by the next request, and would cost it a 502.
        force_close=True,
    )
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT, sock_connect=CONNECT_TIMEOUT),
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        app[SESSION] = session
        yield


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except errors.ProxyError as e:
        if isinstance(e, errors.ClientGone):
            log.info("CLIENT-GONE method=%s path=%s", request.method, request.path)
        else:
            log.warning("REFUSED method=%s path=%s status=%d reason=%s",
                        request.method, request.path, e.status, e)
        return tap.closing(request, web.Response(status=e.status, text=e.text,
                                                 headers=e.headers))
    except Exception:
        log.exception("FAILED method=%s path=%s", request.method, request.path)
        return tap.closing(request, web.Response(status=500, text=INTERNAL_ERROR))


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    metrics.RESPONSES.labels(code=str(response.status)).inc()


async def _handle_preflight(request: web.Request) -> web.Response:
    return web.Response(status=200, headers=CORS_HEADERS)


async def _handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def _handle_upload(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    claims = auth.authorize(request.headers, config.public_key)
    namespace, pvc = claims.namespace, claims.name
    target = await routing.wait_ready(config.resolver, namespace, pvc,
                                      timeout=config.ready_timeout,
                                      interval=config.ready_interval)
    path = routing.upstream_path(request.path, target, namespace=namespace, pvc=pvc)
    return await forward.relay(request, request.app[SESSION], base_url=target.url, path=path,
                               namespace=namespace, pvc=pvc, socket=target.socket)
