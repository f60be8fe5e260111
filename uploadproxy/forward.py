"""The streaming reverse proxy: a request in, the same to the upload server, its answer back.

Disk images are gigabytes, so the body is never held: the request's
``StreamReader`` is handed to the upstream ``ClientSession`` request as an
async iterator.  aiohttp's server pauses reading from the client socket when
its buffer passes about 128 KiB, and the client request's writer waits for the
upstream socket to drain, so a slow upload server slows the uploading client
down and the proxy's memory stays flat whatever the image size.

Only the headers the upload server needs cross: ``Content-Length``,
``Content-Type`` (multipart boundaries included) and ``X-Checksum``; never the
``Authorization`` header, the upload server authenticates the proxy by its
client certificate.  The query string passes as sent (``?offset=N`` of the
resume extension).  The upstream's status, headers (less hop-by-hop ones) and
body come back as they are.

An upload server on this machine that the resolver gives with a Unix socket
(``cdi serve``) is reached through ``local`` instead: plain HTTP over that
socket, with the proxy's own body pump; everything said here about headers,
answers and failures holds for it too.

Failures before the upstream answers are 502 (unreachable, TLS refused, or
connection dropped mid-upload); once its answer has started, a failure can
only cut the client's connection, which this module does rather than let a
truncated body look complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from uploadproxy import errors, local, metrics

__all__ = ["FORWARDED_HEADERS", "relay"]

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("Content-Length", "Content-Type", "X-Checksum")

# RFC 9110 section 7.6.1, plus what the response writer sets itself.
_NOT_RELAYED = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Content-Length", "Date", "Server",
))

_CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 24 * 3600.0  # as app.UPSTREAM_TIMEOUT, if the session has none


class _Body:
    """The client's request body as an async iterator of chunks, counted as they pass."""

    def __init__(self, reader: aiohttp.StreamReader) -> None:
        self._reader = reader
        self.count = 0

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._reader.readany()
        if not chunk:
            raise StopAsyncIteration
        self.count += len(chunk)
        metrics.BYTES.inc(len(chunk))
        return chunk


@dataclass(frozen=True)
class _Upstream:
    namespace: str
    pvc: str
    url: URL


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in FORWARDED_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            headers[name] = value
    return headers


def _upstream_url(base: str, path: str, raw_query: str) -> URL:
    text = base.rstrip("/") + path
    if raw_query:
        text += "?" + raw_query
    return URL(text, encoded=True)


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    path: str,
    namespace: str,
    pvc: str,
    socket: str | None = None,
) -> web.StreamResponse:
    """Send ``request`` to ``base_url`` + ``path`` and stream the answer back.

    With ``socket`` (an upload server on this machine) the request goes to
    that Unix socket instead, in plain HTTP, through ``local``.
    """
    if socket is not None:
        timeout = session.timeout.total or UPSTREAM_TIMEOUT
        return await local.relay(request, socket_path=socket, path=path, namespace=namespace,
                                 pvc=pvc, headers=list(_request_headers(request).items()),
                                 timeout=timeout)
    return await _relay(request, session, base_url=base_url, path=path, namespace=namespace,
                        pvc=pvc)


async def _relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    *,
    base_url: str,
    path: str,
    namespace: str,
    pvc: str,
) -> web.StreamResponse:
    upstream = _Upstream(namespace, pvc,
                         _upstream_url(base_url, path, request.rel_url.raw_query_string))
    where = str(upstream.url.origin())
    body = _Body(request.content) if request.body_exists else None
    started = time.monotonic()
    try:
        async with session.request(
            request.method,
            upstream.url,
            headers=_request_headers(request),
            data=body,
            allow_redirects=False,
        ) as answer:
            response = await _relay_answer(request, answer, upstream)
    except aiohttp.ClientConnectorError as e:
        log.warning("UNREACHABLE namespace=%s pvc=%s upstream=%s error=%s",
                    namespace, pvc, where, e)
        raise errors.UpstreamUnreachable(namespace=namespace, pvc=pvc) from e
    except (aiohttp.ClientError, TimeoutError) as e:
        if _client_gone(request):
            raise errors.ClientGone() from e
        log.warning("UPSTREAM-CLOSED namespace=%s pvc=%s upstream=%s sent=%d error=%r",
                    namespace, pvc, where, body.count if body else 0, e)
        raise errors.UpstreamClosed(namespace=namespace, pvc=pvc) from e
    log.info("PROXIED method=%s path=%s upstream=%s upstream_path=%s namespace=%s pvc=%s "
             "status=%d bytes=%d seconds=%.3f", request.method, request.path, where, path,
             namespace, pvc, response.status, body.count if body else 0,
             time.monotonic() - started)
    return response


async def _relay_answer(
    request: web.Request,
    answer: aiohttp.ClientResponse,
    upstream: _Upstream,
) -> web.StreamResponse:
    """Copy the upstream's answer to the client; cut the client off if it breaks midway."""
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    for name, value in answer.headers.items():
        if name.lower() not in _NOT_RELAYED:
            response.headers.add(name, value)
    if answer.content_length is not None:
        response.content_length = answer.content_length
    await response.prepare(request)
    while True:
        try:
            chunk = await answer.content.read(_CHUNK)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("UPSTREAM-CLOSED-ANSWER namespace=%s pvc=%s upstream=%s error=%r",
                        upstream.namespace, upstream.pvc, upstream.url.origin(), e)
            if request.transport is not None:
                request.transport.close()
            return response
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionError:
            # The client left while we were writing its answer; nobody to tell.
            return response
    await response.write_eof()
    return response
