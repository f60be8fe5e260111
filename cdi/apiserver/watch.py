"""``?watch=true``: store events streamed as newline-delimited JSON.

A watch is a long-lived response, so three things end it besides the store
running out of events: ``timeoutSeconds``, the client going away, and the
server stopping.  aiohttp waits up to its shutdown timeout (60 s) for running
handlers *after* ``on_shutdown`` and *before* ``cleanup_ctx`` teardown, so the
app's ``on_shutdown`` calls :meth:`WatchRegistry.stop`: every open watch sees
the stop event and ends its stream cleanly; one that does not within the grace
period is cancelled.  aiohttp no longer cancels handlers when a client
disconnects, so a quiet watch checks its transport every :data:`POLL` seconds.

Errors: a ``Gone`` (or any ``APIError``) the store raises before the response
has started becomes that error's ``Status`` with its HTTP code (410 for a too
old ``resourceVersion``).  The store may raise it lazily, on the first event,
so the handler waits up to :data:`HEADERS_GRACE` for the first event before it
sends the headers.  After the headers the error is sent in the stream as
Kubernetes does, ``{"type": "ERROR", "object": <Status>}``, and the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web

from cdi.api import errors
from cdi.apiserver.paths import Target
from cdi.apiserver.query import ListQuery
from cdi.backends.port import ObjectStore, WatchEvent

log = logging.getLogger(__name__)

HEADERS_GRACE = 0.2  # seconds: how long a quiet watch may take to send its headers
POLL = 1.0  # seconds between checks that the client is still there
STOP_GRACE = 2.0  # seconds open watches get to end cleanly at shutdown

INTERNAL = "Internal error, see the server log"


class WatchRegistry:
    """The running watch handlers, so the server can end them when it stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Iterator[asyncio.Event]:
        """Register the current task; yields the event set when the server stops."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield self._stopping
        finally:
            self._tasks.discard(task)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """End every open watch: ask, wait up to GRACE seconds, then cancel."""
        self._stopping.set()
        tasks = set(self._tasks)
        if not tasks:
            return
        log.info("STOP watches=%d", len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)


class _Pump:
    """The store's event iterator with at most one ``anext`` in flight."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self._events = events
        self.next = asyncio.ensure_future(self._anext())

    async def _anext(self) -> WatchEvent:
        return await anext(self._events)

    def advance(self) -> None:
        self.next = asyncio.ensure_future(self._anext())

    async def close(self) -> None:
        self.next.cancel()
        await asyncio.wait({self.next})
        if not self.next.cancelled():
            self.next.exception()  # retrieved: nobody else will look at it
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


async def serve(request: web.Request, store: ObjectStore, target: Target, query: ListQuery,
                registry: WatchRegistry) -> web.StreamResponse:
    """Stream the events of TARGET's collection to the client."""
    events = store.watch(target.kind.kind, target.namespace,
                         resource_version=query.resource_version,
                         label_selector=query.label_selector)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + query.timeout_seconds if query.timeout_seconds else None
    with registry.track() as stopping:
        pump = _Pump(events)
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({pump.next}, timeout=HEADERS_GRACE)
            if pump.next.done() and not pump.next.cancelled():
                error = pump.next.exception()
                if isinstance(error, errors.APIError):
                    raise error
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            log.info("WATCH kind=%s namespace=%s resourceVersion=%s", target.kind.kind,
                     target.namespace, query.resource_version)
            try:
                await response.prepare(request)
                await _stream(request, response, pump, query, stopped, deadline)
                await response.write_eof()
            except ConnectionError:
                log.debug("WATCH client went away kind=%s", target.kind.kind)
            return response
        finally:
            stopped.cancel()
            await pump.close()


async def _stream(request: web.Request, response: web.StreamResponse, pump: _Pump,
                  query: ListQuery, stopped: asyncio.Future[Any], deadline: float | None) -> None:
    loop = asyncio.get_running_loop()
    while True:
        timeout = POLL if deadline is None else min(POLL, deadline - loop.time())
        if timeout <= 0:
            return
        await asyncio.wait({pump.next, stopped}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if pump.next.done():
            event = _result(pump.next)
            if event is None:
                return
            if isinstance(event, dict):  # an ERROR event: send it, then end
                await response.write(_line(event))
                return
            if query.matches(event.object):
                await response.write(_line({"type": event.type, "object": event.object}))
            pump.advance()
        elif stopped.done() or client_gone(request):
            return


def _result(future: asyncio.Future[WatchEvent]) -> WatchEvent | dict[str, Any] | None:
    """The next event, an ERROR event for a store error, or None at the end."""
    if future.cancelled():
        return None
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, StopAsyncIteration):
        return None
    if isinstance(error, errors.APIError):
        log.warning("WATCH ended code=%d reason=%s: %s", error.code, error.reason, error.message)
        return {"type": "ERROR", "object": error.status()}
    log.error("WATCH failed", exc_info=error)
    return {"type": "ERROR", "object": errors.APIError(INTERNAL).status()}


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def client_gone(request: web.Request) -> bool:
    """Whether the client of REQUEST has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()
