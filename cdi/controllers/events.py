"""Kubernetes Events for the objects the controllers manage (what ``cdi describe`` shows)."""

from __future__ import annotations

import datetime
import logging
import secrets

from cdi.api import errors
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def emit(store: ObjectStore, obj: Obj, *, reason: str, message: str,
               type_: str = "Normal", component: str = "cdi-controller") -> None:
    meta = obj["metadata"]
    ts = _now()
    event: Obj = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}",
                     "namespace": meta.get("namespace") or "default"},
        "involvedObject": {"apiVersion": obj.get("apiVersion", ""), "kind": obj.get("kind", ""),
                           "namespace": meta.get("namespace", ""), "name": meta["name"],
                           "uid": meta.get("uid", "")},
        "reason": reason, "message": message, "type": type_,
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        "source": {"component": component},
    }
    try:
        await store.create(event)
    except errors.APIError as e:  # events are best effort, as in Kubernetes
        log.warning("EVENT %s for %s not recorded: %s", reason, meta["name"], e)
