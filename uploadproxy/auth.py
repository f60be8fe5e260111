"""Who may upload where: the Authorization header and the token in it.

The proxy has no user accounts.  The API server hands out a token naming one
PVC (``UploadTokenRequest``); whoever holds it may upload to that PVC for
five minutes.  The token is also the only place the proxy learns the PVC
from, so everything here is strict, as CDI's proxy: the header must be exactly
``Bearer <token>`` (scheme case-insensitive, token in the charset
``[A-Za-z0-9-._~+/]``, no query-parameter fallback), and the verified claims
must be for operation ``Upload`` on ``persistentvolumeclaims`` with a
namespace and a name.

Codes follow CDI: a missing or malformed header is 400, a token that fails
verification (garbled, bad signature, expired, not yet valid, wrong issuer)
is 401, a valid token for something else is 400.  The token itself never
reaches a log line or a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cdi.api import tokens
from uploadproxy import errors

__all__ = ["authorize", "bearer_token"]

_BEARER = re.compile(r"bearer[ \t]+([A-Za-z0-9._~+/-]+)[ \t]*", re.IGNORECASE)


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises :class:`errors.MissingAuthorization` or
    :class:`errors.MalformedAuthorization`.
    """
    value = headers.get("Authorization")
    if value is None or not value.strip():
        raise errors.MissingAuthorization()
    match = _BEARER.fullmatch(value.strip())
    if match is None:
        raise errors.MalformedAuthorization()
    return match.group(1)


def authorize(headers: Mapping[str, str], public_key: RSAPublicKey) -> tokens.Claims:
    """The claims of the request's upload token, checked for an upload to some PVC."""
    token = bearer_token(headers)
    try:
        claims = tokens.verify(public_key, token)
    except tokens.TokenError as e:
        raise errors.InvalidToken(reason=str(e)) from e
    try:
        tokens.check(claims, operation=tokens.UPLOAD)
    except tokens.TokenError as e:
        raise errors.TokenNotAllowed(reason=str(e)) from e
    return claims
