"""The controller runtime: watch kinds, queue object keys, reconcile one key at a time.

Modelled on kopf's queueing: one worker per object key, so an object's
reconciles run in order while different objects run in parallel (bounded by
``max_parallel``).  Reconcile is level-triggered: an event only says "look at
this key again"; events for a key that is already waiting are coalesced.  A
reconcile returns ``Result(requeue_after=...)`` to be called again later, or
raises ``TemporaryError(delay)`` (try again), ``PermanentError`` (do not), or
anything else (logged, retried with per-key exponential backoff).  Watches
list first, then watch from the list's resourceVersion, and relist on ``Gone``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
Mapper = Callable[[Obj], Iterable[Key]]

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
RELIST_DELAY = 1.0


class TemporaryError(Exception):
    """Try again after ``delay`` seconds (a source not ready, a conflict)."""

    def __init__(self, message: str = "", delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(Exception):
    """Retrying cannot help; the reconcile has recorded what went wrong."""


@dataclasses.dataclass(frozen=True)
class Result:
    requeue_after: float | None = None


class Controller(Protocol):
    name: str
    kind: str  # the primary kind; its own events map to its own key

    def watches(self) -> dict[str, Mapper]:
        """Other kinds to watch, each with a function from an object to primary keys."""
        ...

    async def reconcile(self, key: Key) -> Result | None: ...


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata", {})
    return (meta.get("namespace", ""), meta["name"])


def owner_keys(kind: str) -> Mapper:
    """Map an object to the keys of its owners of KIND (same namespace)."""

    def mapper(obj: Obj) -> Iterable[Key]:
        meta = obj.get("metadata", {})
        for ref in meta.get("ownerReferences", []):
            if ref.get("kind") == kind:
                yield (meta.get("namespace", ""), ref["name"])

    return mapper


class _Queue:
    """Pending keys of one controller, with a worker task per busy key."""

    def __init__(self, controller: Controller, semaphore: asyncio.Semaphore,
                 tasks: set[asyncio.Task[None]]) -> None:
        self._controller = controller
        self._semaphore = semaphore
        self._tasks = tasks
        self._dirty: set[Key] = set()
        self._running: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}

    def add(self, key: Key) -> None:
        self._dirty.add(key)
        if key not in self._running:
            self._running.add(key)
            task = asyncio.get_running_loop().create_task(self._work(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def add_after(self, key: Key, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            if old.when() <= asyncio.get_running_loop().time() + delay:
                self._timers[key] = old  # an earlier retry is already planned
                return
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def _work(self, key: Key) -> None:
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                async with self._semaphore:
                    delay = await self._reconcile(key)
                if delay is not None:
                    self.add_after(key, delay)
        finally:
            self._running.discard(key)

    async def _reconcile(self, key: Key) -> float | None:
        c = self._controller
        try:
            result = await c.reconcile(key)
        except asyncio.CancelledError:
            raise
        except TemporaryError as e:
            log.info("[%s/%s] %s: retry in %.1fs: %s", key[0], key[1], c.name, e.delay, e)
            return e.delay
        except api_errors.Conflict:
            log.debug("[%s/%s] %s: conflict, retrying", key[0], key[1], c.name)
            return 0.1
        except PermanentError as e:
            log.warning("[%s/%s] %s: permanent error: %s", key[0], key[1], c.name, e)
            self._failures.pop(key, None)
            return None
        except Exception:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            delay: float = min(BACKOFF_START * 2.0 ** (n - 1), BACKOFF_MAX)
            log.exception("[%s/%s] %s: reconcile failed (attempt %d), retry in %.0fs",
                          key[0], key[1], c.name, n, delay)
            return delay
        self._failures.pop(key, None)
        return result.requeue_after if result is not None else None

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


class Runtime:
    """Runs controllers against a store until stopped."""

    def __init__(self, store: ObjectStore, *, max_parallel: int = 32) -> None:
        self._store = store
        self._semaphore = asyncio.Semaphore(max_parallel)
        self._controllers: list[Controller] = []
        self._queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchers: list[asyncio.Task[None]] = []

    def add(self, controller: Controller) -> None:
        self._controllers.append(controller)
        self._queues[controller.name] = _Queue(controller, self._semaphore, self._tasks)

    def enqueue(self, controller: str, key: Key, delay: float = 0.0) -> None:
        q = self._queues[controller]
        if delay > 0:
            q.add_after(key, delay)
        else:
            q.add(key)

    async def start(self) -> None:
        # Group mappers by kind so each kind is watched once.
        by_kind: dict[str, list[tuple[_Queue, Mapper]]] = {}
        for c in self._controllers:
            q = self._queues[c.name]
            by_kind.setdefault(c.kind, []).append((q, lambda o: [key_of(o)]))
            for kind, mapper in c.watches().items():
                by_kind.setdefault(kind, []).append((q, mapper))
        for kind, targets in by_kind.items():
            self._watchers.append(asyncio.get_running_loop().create_task(
                self._watch(kind, targets), name=f"watch-{kind}"))

    async def stop(self) -> None:
        for q in self._queues.values():
            q.cancel_timers()
        tasks = [*self._watchers, *self._tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()

    async def _watch(self, kind: str, targets: list[tuple[_Queue, Mapper]]) -> None:
        def dispatch(obj: Obj) -> None:
            for q, mapper in targets:
                for key in mapper(obj):
                    q.add(key)

        while True:
            try:
                listed = await self._store.list(kind)
                for obj in listed.items:
                    dispatch(obj)
                async for event in self._store.watch(kind,
                                                     resource_version=listed.resource_version):
                    dispatch(event.object)
                return  # the store closed
            except asyncio.CancelledError:
                raise
            except api_errors.Gone:
                log.info("WATCH %s expired, relisting", kind)
            except Exception:
                log.exception("WATCH %s failed, relisting in %.0fs", kind, RELIST_DELAY)
                await asyncio.sleep(RELIST_DELAY)


async def run_guarded(name: str, coro: Awaitable[None]) -> None:
    """Await a background coroutine, logging a crash instead of losing it."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task %s crashed", name)
