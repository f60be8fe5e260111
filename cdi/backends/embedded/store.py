"""``SQLiteStore``: the object store of ``cdi serve``, one SQLite file, no cluster.

The controllers and the REST API reach objects only through the
``ObjectStore`` port (``cdi.backends.port``).  This adapter implements it for
a single process: objects live in SQLite (``db``), writes follow the
Kubernetes API server's rules (``writes``), and watches are served from an
in-memory history of recent events (``history``).

Threading.  All SQLite work runs on one dedicated thread (a one-worker
``ThreadPoolExecutor``), awaited with ``run_in_executor``: the event loop never
waits on the disk, and writes are serialized without locks.  After a write
commits, the database thread hands its events to the loop with
``call_soon_threadsafe``; that happens before the writer's own result is
delivered, so events reach the history in commit order, and by the time a
write (or a ``list``) returns, every event up to its resourceVersion is in the
history.  The store is bound to the event loop that opened it.

Durability.  WAL with ``synchronous=FULL``: a write is acknowledged only after
its commit is synced, so ``kill -9`` (or power loss) loses nothing that was
acknowledged.  The resourceVersion counter is stored with the objects.  The
watch history is not: after a restart a watch from an older version gets
``Gone`` and the client relists, as after an API server restart.

Watches filter by kind, namespace and labels *at event time*: an object
whose labels stop matching a selector produces no event for that watch (no
synthetic ``DELETED``), and one that starts matching shows up as
``MODIFIED``.  Each watch has an unbounded queue (see ``history``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import enum
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cdi.api.errors import BadRequest, Gone, NotFound
from cdi.backends.embedded import selectors
from cdi.backends.embedded.db import Database, Key, dump
from cdi.backends.embedded.history import History, Subscription
from cdi.backends.embedded.writes import Transaction, kind_of, labels_of, scope
from cdi.backends.port import Obj, ObjectList, WatchEvent

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_HISTORY_SIZE = 10_000
"""Events kept for watches that resume: about what a busy controller writes in
minutes.  A watch that falls further behind relists."""


class StoreClosed(RuntimeError):
    """The store is not open (not yet, or no longer)."""


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SQLiteStore:
    """An ``ObjectStore`` in the SQLite database at ``path``.

    Use ``await store.open()`` and ``await store.close()``, or
    ``async with SQLiteStore(path) as store``.  ``history_size`` is how many
    events watches can resume from.
    """

    def __init__(self, path: Path, *, history_size: int = DEFAULT_HISTORY_SIZE) -> None:
        self.path = path
        self._history = History(history_size, 0)
        self._state = _State.NEW
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: Database | None = None  # touched only on the database thread

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Open the database, creating the file and schema if missing.

        Raises ``db.DatabaseInUse`` if another process has it open.
        """
        if self._state is not _State.NEW:
            raise StoreClosed(f"{self.path}: a store can be opened once")
        self._loop = asyncio.get_running_loop()
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cdi-store")
        try:
            rv = await self._loop.run_in_executor(executor, self._open_db)
        except BaseException:
            executor.shutdown(wait=True)
            raise
        self._executor = executor
        self._history = History(self._history.size, rv)
        self._state = _State.OPEN
        log.info("OPEN path=%s resource_version=%d", self.path, rv)

    async def close(self) -> None:
        """Finish queued operations, close the database and end every watch."""
        if self._state is not _State.OPEN or self._executor is None:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        executor, self._executor = self._executor, None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_db)
        finally:
            executor.shutdown(wait=True)  # idle by now: only joins the thread
            self._history.close()
            log.info("CLOSE path=%s resource_version=%d", self.path,
                     self._history.resource_version)

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def watches(self) -> int:
        """How many watches are being served (for metrics)."""
        return self._history.watchers

    # -- reads -------------------------------------------------------------

    async def get(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        k = kind_of(kind)
        key = Key(k.kind, scope(k, namespace), name)
        obj = await self._call(functools.partial(self._get_db, key))
        if obj is None:
            raise NotFound.of(k.kind, name)
        return obj

    async def list(self, kind: str, namespace: str | None = None, *,
                   label_selector: str | None = None) -> ObjectList:
        k = kind_of(kind)
        selector = selectors.parse(label_selector)
        ns = namespace if k.namespaced and namespace else None
        return await self._call(functools.partial(self._list_db, k.kind, ns, selector))

    # -- writes ------------------------------------------------------------

    async def create(self, obj: Obj) -> Obj:
        mine = _copy_in(obj)
        return await self._write(lambda tx: tx.create(mine))

    async def replace(self, obj: Obj) -> Obj:
        mine = _copy_in(obj)
        return await self._write(lambda tx: tx.replace(mine))

    async def replace_status(self, obj: Obj) -> Obj:
        mine = _copy_in(obj)
        return await self._write(lambda tx: tx.replace_status(mine))

    async def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        mine = _copy_in(patch)
        return await self._write(lambda tx: tx.patch(kind, name, namespace, mine))

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        return await self._write(lambda tx: tx.delete(kind, name, namespace))

    # -- watch -------------------------------------------------------------

    def watch(self, kind: str, namespace: str | None = None, *,
              resource_version: str | None = None,
              label_selector: str | None = None) -> AsyncIterator[WatchEvent]:
        """Events of ``kind`` (in ``namespace`` unless None) after
        ``resource_version``, or after the current version if None.

        Bad arguments, a closed store and a too old version raise here;
        ``Gone`` can also come from the first iteration if the history moved
        past the version in between.  The iterator ends when the store closes.
        """
        if self._state is not _State.OPEN:
            raise StoreClosed(f"{self.path}: the store is not open")
        k = kind_of(kind)
        selector = selectors.parse(label_selector)
        ns = namespace if k.namespaced and namespace else None
        if resource_version is None or resource_version == "":
            after = self._history.resource_version
        else:
            after = _parse_rv(resource_version)
        if after < self._history.floor:
            raise Gone(f"too old resource version: {after} ({self._history.floor + 1})")

        def wants(event: WatchEvent) -> bool:
            obj = event.object
            return (obj["kind"] == k.kind
                    and (ns is None or obj["metadata"].get("namespace") == ns)
                    and selector.matches(labels_of(obj)))

        return self._stream(wants, after)

    async def _stream(self, wants: Callable[[WatchEvent], bool],
                      after: int) -> AsyncIterator[WatchEvent]:
        sub: Subscription = self._history.subscribe(wants, after)
        try:
            while (event := await sub.queue.get()) is not None:
                yield WatchEvent(event.type, copy.deepcopy(event.object))
        finally:
            self._history.unsubscribe(sub)

    # -- the database thread -------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._state is not _State.OPEN or self._executor is None:
            raise StoreClosed(f"{self.path}: the store is not open")
        call = functools.partial(contextvars.copy_context().run, fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _write(self, verb: Callable[[Transaction], Obj]) -> Obj:
        return await self._call(functools.partial(self._write_db, verb))

    def _open_db(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Database.open(self.path)
        return self._db.resource_version()

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _database(self) -> Database:
        if self._db is None:
            raise StoreClosed(f"{self.path}: the store is not open")
        return self._db

    def _get_db(self, key: Key) -> Obj | None:
        return self._database().get(key)

    def _list_db(self, kind: str, namespace: str | None,
                 selector: selectors.Selector) -> ObjectList:
        db = self._database()
        items = [obj for obj in db.list_kind(kind, namespace) if selector.matches(labels_of(obj))]
        return ObjectList(items, str(db.resource_version()))

    def _write_db(self, verb: Callable[[Transaction], Obj]) -> Obj:
        db = self._database()
        with db.transaction():
            tx = Transaction(db)
            result = verb(tx)
            if tx.events:
                db.set_resource_version(tx.rv)
        if tx.events:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._history.publish, tx.events)
        return result


def _copy_in(obj: Any) -> Obj:
    """A private copy of a caller's object, refusing anything that is not JSON."""
    if not isinstance(obj, dict):
        raise BadRequest(f"expected a JSON object, got {type(obj).__name__}")
    try:
        mine: Obj = json.loads(dump(obj))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"object is not valid JSON: {e}") from e
    return mine


def _parse_rv(resource_version: str) -> int:
    try:
        rv = int(resource_version)
    except ValueError:
        rv = -1
    if rv < 0:
        raise BadRequest(f"invalid resourceVersion {resource_version!r}")
    return rv
