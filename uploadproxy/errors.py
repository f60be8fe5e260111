"""What the upload proxy answers when it does not forward an upload.

Every refusal is a :class:`ProxyError` with its HTTP status and a short
``text/plain`` message.  The message is a template over named fields; each
field is HTML-escaped before it is put in, because fields echo input (PVC
names from the token, reasons from the resolver) and some clients show the
body in a browser (CDI escapes these texts too).  The error middleware in
``app`` is the only place that turns these into responses; any other
exception becomes a 500 that says to look at the log.

Tree, with status codes:

    ProxyError
    +-- MissingAuthorization    400  no Authorization header
    +-- MalformedAuthorization  400  not "Bearer <token>" with the JWT charset
    +-- InvalidToken            401  bad signature, expired, wrong issuer, garbled
    +-- TokenNotAllowed         400  valid token, but not for an upload to a PVC
    +-- UploadRefused           503  the resolver says the PVC cannot take an upload
    +-- UploadServerNotReady    503  still not ready after the wait
    +-- InvalidContentType      503  the PVC's content type is neither kubevirt nor archive
    +-- UpstreamUnreachable     502  cannot connect to the upload server (or TLS fails)
    +-- UpstreamClosed          502  the upload server dropped the connection before answering
    +-- ClientGone              499  the client went away; nobody reads this answer
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import ClassVar

__all__ = [
    "ClientGone",
    "InvalidContentType",
    "InvalidToken",
    "MalformedAuthorization",
    "MissingAuthorization",
    "ProxyError",
    "TokenNotAllowed",
    "UploadRefused",
    "UploadServerNotReady",
    "UpstreamClosed",
    "UpstreamUnreachable",
]


class ProxyError(Exception):
    """A refusal with a status code; ``text`` is the escaped body, ``str()`` the raw one."""

    status: ClassVar[int] = 500
    msg: ClassVar[str] = "upload proxy error"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **fields: object) -> None:
        self.fields = fields
        super().__init__(self.msg.format_map({k: str(v) for k, v in fields.items()}))

    @property
    def text(self) -> str:
        """The message with every field HTML-escaped, for the response body."""
        return self.msg.format_map({k: html.escape(str(v)) for k, v in self.fields.items()})


class MissingAuthorization(ProxyError):
    status = 400
    msg = 'missing Authorization header, expected "Authorization: Bearer TOKEN"'


class MalformedAuthorization(ProxyError):
    status = 400
    msg = 'malformed Authorization header, expected "Authorization: Bearer TOKEN"'


class InvalidToken(ProxyError):
    status = 401
    msg = "invalid token: {reason}"
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class TokenNotAllowed(ProxyError):
    status = 400
    msg = "token does not allow this upload: {reason}"


class UploadRefused(ProxyError):
    status = 503
    msg = "{reason}"


class UploadServerNotReady(ProxyError):
    status = 503
    msg = "upload server for {namespace}/{pvc} is not ready: {reason}"


class InvalidContentType(ProxyError):
    status = 503
    msg = ("rejecting upload request for PVC {namespace}/{pvc}: "
           "upload content-type {content_type} is invalid")


class UpstreamUnreachable(ProxyError):
    status = 502
    msg = "cannot reach the upload server for {namespace}/{pvc}"


class UpstreamClosed(ProxyError):
    status = 502
    msg = "the upload server for {namespace}/{pvc} closed the connection before answering"


class ClientGone(ProxyError):
    status = 499
    msg = "the client closed the connection"
