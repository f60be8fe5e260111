"""Two Prometheus counters: bytes sent on to upload servers, and answers by status.

They say whether uploads flow and how they fail, without a per-PVC label
(PVC names are unbounded).  They live in prometheus-client's default registry,
so a host process that already exposes ``/metrics`` (``cdi serve``) shows
them; ``create_app(metrics=True)`` also serves them from the proxy itself.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import REGISTRY, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["BYTES", "RESPONSES", "handle_metrics"]

BYTES = Counter(
    "cdi_uploadproxy_upload_bytes",
    "Bytes of request bodies the upload proxy sent on to upload servers",
)
RESPONSES = Counter(
    "cdi_uploadproxy_responses",
    "Responses of the upload proxy by HTTP status code",
    ["code"],
)


async def handle_metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` in the Prometheus text format."""
    return web.Response(body=generate_latest(REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
