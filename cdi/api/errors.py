"""API errors, shaped like Kubernetes ``Status`` failures.

Every layer of the control plane raises these; the REST API turns them into a
``Status`` object with the HTTP code, the CLI into one line.  The reasons are
Kubernetes' own (``NotFound``, ``AlreadyExists``, ``Conflict``, ``Invalid``,
``Gone``, ...), so clients written for Kubernetes understand them.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    code = 500
    reason = "InternalError"

    def __init__(self, message: str, *, kind: str = "", name: str = "",
                 causes: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.name = name
        self.causes = causes or []

    def status(self) -> dict[str, Any]:
        """The Kubernetes ``Status`` object for this error."""
        details: dict[str, Any] = {}
        if self.name:
            details["name"] = self.name
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = self.causes
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if details:
            status["details"] = details
        return status


class BadRequest(APIError):
    code = 400
    reason = "BadRequest"


class Unauthorized(APIError):
    code = 401
    reason = "Unauthorized"


class Forbidden(APIError):
    code = 403
    reason = "Forbidden"


class NotFound(APIError):
    code = 404
    reason = "NotFound"

    @classmethod
    def of(cls, kind: str, name: str) -> NotFound:
        return cls(f'{kind.lower()} "{name}" not found', kind=kind, name=name)


class MethodNotAllowed(APIError):
    code = 405
    reason = "MethodNotAllowed"


class AlreadyExists(APIError):
    code = 409
    reason = "AlreadyExists"

    @classmethod
    def of(cls, kind: str, name: str) -> AlreadyExists:
        return cls(f'{kind.lower()} "{name}" already exists', kind=kind, name=name)


class Conflict(APIError):
    code = 409
    reason = "Conflict"

    @classmethod
    def of(cls, kind: str, name: str) -> Conflict:
        return cls(
            f'Operation cannot be fulfilled on {kind.lower()} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            kind=kind, name=name,
        )


class Gone(APIError):
    code = 410
    reason = "Expired"


class Invalid(APIError):
    """Validation (admission) failure: CDI's webhook message, HTTP 422."""

    code = 422
    reason = "Invalid"


class UnsupportedMediaType(APIError):
    code = 415
    reason = "UnsupportedMediaType"
