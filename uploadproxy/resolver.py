"""The port through which the proxy finds a PVC's upload server.

The proxy knows tokens and HTTP, not where upload servers run: on Kubernetes
that is a Service in the PVC's namespace, in ``cdi serve`` a worker subprocess
on a local port.  Each backend implements :class:`Resolver`; the proxy polls it
until the server is ready (see ``routing.wait_ready``).  This module imports
nothing from the control plane, so a backend can implement the protocol
without the proxy depending on it.

A resolver answers one of four ways:

- an :class:`UploadTarget`: the upload server is ready, here is its base URL;
- ``None`` or :class:`NotReadyYet`: not ready yet (pod starting, not ready),
  ask again; ``NotReadyYet`` carries a reason the proxy reports if the wait
  times out;
- :class:`NotUploadTarget`: the PVC does not exist, is not an upload target or
  has already finished uploading; waiting will not help, the proxy answers at
  once with the reason (CDI's texts, e.g. "PVC x is not an upload target").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ARCHIVE", "KUBEVIRT", "NotReadyYet", "NotUploadTarget", "Resolver", "UploadTarget",
           "check_claim"]

KUBEVIRT = "kubevirt"
ARCHIVE = "archive"
UPLOAD_TARGET = "cdi.kubevirt.io/storage.upload.target"
POD_PHASE = "cdi.kubevirt.io/storage.pod.phase"


@dataclass(frozen=True)
class UploadTarget:
    """A ready upload server.

    ``url`` is the base URL without a path, ``https://10.0.0.7:8443`` on a
    cluster or ``https://127.0.0.1:40123`` in embedded mode.  ``content_type`` is
    the PVC's ``cdi.kubevirt.io/storage.contentType`` (``kubevirt``, ``""`` or
    ``archive``): the proxy sends archive uploads to the archive endpoints.
    ``socket``, when set, is the server's Unix socket on this machine: the
    proxy then sends there, in plain HTTP, instead of to ``url`` (only a
    resolver that knows the socket is private to the proxy's user may hand one
    out; in ``cdi serve``, ``<data dir>/run``, see ``docs/security.md``).
    """

    url: str
    content_type: str = KUBEVIRT
    socket: str | None = None


class NotUploadTarget(Exception):
    """The PVC cannot take an upload, now or later; ``reason`` is shown to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotReadyYet(Exception):
    """The upload server is not ready yet; ``reason`` says what it waits for."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Resolver(Protocol):
    """Finds the upload server of a PVC (see the module docstring for the answers)."""

    async def upload_server(self, namespace: str, pvc: str) -> UploadTarget | None:
        ...


def check_claim(pvc: str, claim: Mapping[str, Any] | None) -> Mapping[str, str]:
    """The claim's annotations if it can take an upload; else NotUploadTarget with CDI's
    text (no claim, not an upload target, upload already finished).  Both backends'
    resolvers start with this."""
    if claim is None:
        raise NotUploadTarget(f"rejecting Upload Request for PVC {pvc} that doesn't exist")
    annotations: Mapping[str, str] = (claim.get("metadata") or {}).get("annotations") or {}
    if UPLOAD_TARGET not in annotations:
        raise NotUploadTarget(f"PVC {pvc} is not an upload target")
    if annotations.get(POD_PHASE) == "Succeeded":
        raise NotUploadTarget(f"PVC {pvc} already finished uploading")
    return annotations
