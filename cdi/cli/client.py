"""The CLI's HTTP client for the REST API (``requests``, synchronous).

The CLI is a short-lived sync program, so it uses ``requests`` rather than an
event loop.  Errors come back as exceptions that the commands print as one
line: :class:`StatusError` for a ``Status`` the server sent
(``Error from server (NotFound): ...``), :class:`ConnectionFailed` when the
server cannot be reached.  The token goes only into the ``Authorization``
header; no message here contains it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import requests

from cdi.api.kinds import Kind

TIMEOUT = 30.0  # seconds for connecting and for each read of a plain request
CONNECT_TIMEOUT = 10.0


class ClientError(Exception):
    """Base of the errors the CLI prints."""


class ConnectionFailed(ClientError):
    pass


class StatusError(ClientError):
    """A failure ``Status`` from the server."""

    def __init__(self, status: dict[str, Any], code: int) -> None:
        self.status = status
        self.code = int(status.get("code") or code)
        self.reason = str(status.get("reason") or "Unknown")
        self.message = str(status.get("message") or "")
        super().__init__(f"Error from server ({self.reason}): {self.message}")


class Client:
    """A session with the API server at URL, authenticated with TOKEN."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None,
                 timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self._session.headers["Accept"] = "application/json"
        if ca_file:
            self._session.verify = ca_file

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- verbs -------------------------------------------------------------

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self._json("GET", _path(kind, namespace, name))

    def list(self, kind: Kind, namespace: str | None = None, *,
             label_selector: str | None = None,
             field_selector: str | None = None) -> dict[str, Any]:
        params = _selectors(label_selector, field_selector)
        return self._json("GET", _path(kind, namespace), params=params)

    def create(self, kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", _path(kind, _namespace(obj)), body=obj)

    def replace(self, kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
        return self._json("PUT", _path(kind, _namespace(obj), obj["metadata"]["name"]),
                          body=obj)

    def patch(self, kind: Kind, name: str, namespace: str | None,
              patch: dict[str, Any]) -> dict[str, Any]:
        return self._json("PATCH", _path(kind, namespace, name), body=patch,
                          content_type="application/merge-patch+json")

    def delete(self, kind: Kind, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self._json("DELETE", _path(kind, namespace, name))

    def log(self, namespace: str, pod: str) -> bytes:
        response = self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log")
        with response:
            return response.content

    def watch(self, kind: Kind, namespace: str | None = None, *,
              resource_version: str | None = None, label_selector: str | None = None,
              field_selector: str | None = None,
              timeout_seconds: int | None = None) -> Iterator[dict[str, Any]]:
        """The watch events (``{"type": ..., "object": ...}``) until the server ends
        the stream; an ``ERROR`` event raises :class:`StatusError`."""
        params = _selectors(label_selector, field_selector)
        params["watch"] = "true"
        if resource_version:
            params["resourceVersion"] = resource_version
        if timeout_seconds:
            params["timeoutSeconds"] = str(timeout_seconds)
        read_timeout = timeout_seconds + TIMEOUT if timeout_seconds else None
        response = self._request("GET", _path(kind, namespace), params=params, stream=True,
                                 timeout=(CONNECT_TIMEOUT, read_timeout))
        with response:
            try:
                for line in response.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        raise StatusError(event.get("object") or {}, 500)
                    yield event
            except requests.RequestException as e:
                raise ConnectionFailed(f"error: the watch on {self.url} failed: {e}") from e

    # -- plumbing ----------------------------------------------------------

    def _json(self, method: str, path: str, *, params: dict[str, str] | None = None,
              body: dict[str, Any] | None = None,
              content_type: str = "application/json") -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else {}
        response = self._request(method, path, params=params, data=data, headers=headers)
        with response:
            try:
                result = response.json()
            except ValueError as e:
                raise ClientError(f"error: the server sent a response that is not JSON "
                                  f"({method} {path})") from e
        if not isinstance(result, dict):
            raise ClientError(f"error: the server sent a response that is not an object "
                              f"({method} {path})")
        return result

    def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                 data: bytes | None = None, headers: dict[str, str] | None = None,
                 stream: bool = False,
                 timeout: tuple[float, float | None] | None = None) -> requests.Response:
        try:
            response = self._session.request(
                method, self.url + path, params=params, data=data, headers=headers,
                stream=stream, timeout=timeout or (CONNECT_TIMEOUT, self.timeout))
        except requests.RequestException as e:
            raise ConnectionFailed(
                f"error: cannot reach the cdi server at {self.url}: {_cause(e)}") from e
        if response.status_code >= 400:
            with response:
                raise _status_error(response)
        return response


def _status_error(response: requests.Response) -> StatusError:
    try:
        status = response.json()
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        text = response.text[:256].strip()
        status = {"code": response.status_code, "reason": response.reason or "Unknown",
                  "message": text or f"the server responded with {response.status_code}"}
    return StatusError(status, response.status_code)


def _path(kind: Kind, namespace: str | None, name: str | None = None) -> str:
    return kind.path(namespace if kind.namespaced else None, name)


def _namespace(obj: dict[str, Any]) -> str | None:
    namespace = (obj.get("metadata") or {}).get("namespace")
    return str(namespace) if namespace else None


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _cause(e: requests.RequestException) -> str:
    """The innermost reason of a requests error (``[Errno 111] Connection refused``),
    without the pool and URL details the outer layers repeat."""
    cause: BaseException = e
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    return str(cause) or type(cause).__name__
