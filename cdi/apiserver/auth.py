"""Bearer-token authentication for every request but ``GET /healthz``.

``cdi serve`` makes one random token and writes it to a 0600 file; whoever can
read that file may use the API.  The header is parsed strictly
(``Authorization: Bearer <token>``, one space, nothing after the token) and
compared with :func:`hmac.compare_digest` so timing does not reveal the token.
A missing, malformed or wrong header is the same 401 ``Status``: the client
learns nothing about which part was wrong, and the token is never logged.
"""

from __future__ import annotations

import hmac
import re

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cdi.api import errors

UNAUTHENTICATED = {("GET", "/healthz"), ("HEAD", "/healthz")}

_BEARER = re.compile(r"Bearer ([\x21-\x7e]+)")


def bearer_token(header: str | None) -> str | None:
    """The token in an ``Authorization`` header value, or None if it has none."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header)
    return match.group(1) if match else None


def middleware(token: str) -> Middleware:
    """A middleware that lets through only requests bearing TOKEN."""
    if not token:
        raise ValueError("the API token must not be empty")
    expected = token.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) not in UNAUTHENTICATED:
            given = bearer_token(request.headers.get("Authorization"))
            if given is None or not hmac.compare_digest(given.encode(), expected):
                raise errors.Unauthorized("Unauthorized")
        return await handler(request)

    return authenticate
