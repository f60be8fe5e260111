"""Where an upload goes: the proxy's endpoints, the wait for the upload server, the upstream path.

The endpoint table is CDI's (upload server and proxy share it) plus our
resume extension; ``app`` registers routes from it.  A request's upstream is
decided in two steps:

1. :func:`wait_ready` asks the :class:`~uploadproxy.resolver.Resolver` every
   ``interval`` seconds for up to ``timeout`` (CDI: 1 s and 10 s) until the
   PVC's upload server is ready; a PVC that cannot take an upload is refused
   at once, one still not ready at the end gets 503.
2. :func:`upstream_path` keeps the path, except for PVCs whose content type is
   ``archive``: CDI's proxy sends those to the upload server's archive
   endpoint of the same API version.  We keep the ``-async`` flavour, which
   the upload server serves as ``upload-archive-async``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from uploadproxy import errors
from uploadproxy.resolver import (
    ARCHIVE,
    KUBEVIRT,
    NotReadyYet,
    NotUploadTarget,
    Resolver,
    UploadTarget,
)

__all__ = [
    "API_VERSIONS",
    "HEALTHZ_PATH",
    "OFFSET_PATH",
    "UPLOAD_NAMES",
    "async_paths",
    "upload_paths",
    "upstream_path",
    "wait_ready",
]

log = logging.getLogger(__name__)

API_VERSIONS = ("v1beta1", "v1alpha1")
UPLOAD_NAMES = (
    "upload",
    "upload-async",
    "upload-form",
    "upload-form-async",
    "upload-archive",
    "upload-archive-async",
)
HEALTHZ_PATH = "/healthz"
OFFSET_PATH = "/v1beta1/upload-offset"
"""Resume extension: how many bytes the upload server has committed (GET)."""

_TO_ARCHIVE = {
    "upload": "upload-archive",
    "upload-form": "upload-archive",
    "upload-async": "upload-archive-async",
    "upload-form-async": "upload-archive-async",
}


def upload_paths() -> Iterator[str]:
    """Every POST endpoint, ``/v1beta1/upload`` ... ``/v1alpha1/upload-archive-async``."""
    for version in API_VERSIONS:
        for name in UPLOAD_NAMES:
            yield f"/{version}/{name}"


def async_paths() -> Iterator[str]:
    """The endpoints a client may probe with HEAD to learn whether async upload exists."""
    return (path for path in upload_paths() if path.endswith("-async"))


def upstream_path(path: str, target: UploadTarget, *, namespace: str, pvc: str) -> str:
    """The path on the upload server for a request to ``path`` on the proxy."""
    if target.content_type in (KUBEVIRT, ""):
        return path
    if target.content_type != ARCHIVE:
        raise errors.InvalidContentType(namespace=namespace, pvc=pvc,
                                        content_type=target.content_type)
    version, _, name = path.lstrip("/").partition("/")
    if version not in API_VERSIONS or name not in _TO_ARCHIVE:
        return path
    return f"/{version}/{_TO_ARCHIVE[name]}"


async def wait_ready(
    resolver: Resolver,
    namespace: str,
    pvc: str,
    *,
    timeout: float,
    interval: float,
) -> UploadTarget:
    """The PVC's upload server once the resolver says it is ready.

    Raises :class:`errors.UploadRefused` as soon as the resolver says the PVC
    cannot take an upload, and :class:`errors.UploadServerNotReady` (with the
    resolver's last reason) when it is still not ready after ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    reason = f"still not ready after {timeout:g} s"
    attempts = 0
    while True:
        attempts += 1
        try:
            # A resolver that hangs (an API server under load) must not hold the client
            # past the wait: each question gets what is left of it, or one interval.
            async with asyncio.timeout(max(deadline - loop.time(), interval)):
                target = await resolver.upload_server(namespace, pvc)
        except NotUploadTarget as e:
            raise errors.UploadRefused(reason=e.reason) from e
        except NotReadyYet as e:
            target, reason = None, e.reason
        except TimeoutError:
            target, reason = None, "no answer about the upload server in time"
        if target is not None:
            if attempts > 1:
                log.info("READY namespace=%s pvc=%s attempts=%d", namespace, pvc, attempts)
            return target
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise errors.UploadServerNotReady(namespace=namespace, pvc=pvc, reason=reason)
        await asyncio.sleep(min(interval, remaining))
