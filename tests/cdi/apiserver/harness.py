"""A real API server over a real SQLiteStore, on 127.0.0.1, in a background thread.

pytest-asyncio is not used: the server gets its own event loop in a thread,
as ``cdi serve`` runs it (``web.AppRunner`` + ``TCPSite`` on port 0), and
tests talk to it over HTTP with ``requests`` or the ``cdi`` command.
:meth:`ApiServer.call` runs a coroutine on the server's loop, for tests that
need the store directly.  ``stop`` tears down exactly as ``cdi serve`` does
(``runner.cleanup()``, then ``store.close()``) and says how long it took.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from cdi.apiserver.app import create_app
from cdi.apiserver.routes import Admit, PodLogs
from cdi.backends.embedded.store import SQLiteStore

T = TypeVar("T")

TOKEN = "test-token-0123456789"


class ApiServer:
    def __init__(self, db: Path, *, token: str = TOKEN, admit: Admit | None = None,
                 pod_logs: PodLogs | None = None, history_size: int | None = None,
                 store_class: type[SQLiteStore] = SQLiteStore) -> None:
        self.db = db
        self.token = token
        self.admit = admit
        self.pod_logs = pod_logs
        self.history_size = history_size
        self.store_class = store_class
        self.url = ""
        self.store: SQLiteStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._main, name="apiserver", daemon=True)
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def call(self, make: Callable[[SQLiteStore], Awaitable[T]]) -> T:
        """Run ``make(store)`` on the server's loop and return its result."""
        assert self._loop is not None and self.store is not None
        store = self.store

        async def run() -> T:
            return await make(store)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self) -> float:
        """Stop the server like ``cdi serve`` does; the seconds it took."""
        if self._loop is None or self._thread is None:
            return 0.0
        start = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._teardown(), self._loop).result(timeout=90)
        elapsed = time.monotonic() - start
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop = None
        return elapsed

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:
            self._started.set_exception(e)
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            return
        self._loop = loop
        self._started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _setup(self) -> None:
        if self.history_size is None:
            self.store = self.store_class(self.db)
        else:
            self.store = self.store_class(self.db, history_size=self.history_size)
        await self.store.open()
        app = create_app(self.store, token=self.token, admit=self.admit,
                         pod_logs=self.pod_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _teardown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            await self.store.close()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def datavolume(name: str, *, namespace: str | None = "default",
               labels: dict[str, str] | None = None, url: str = "http://example.com/d.img",
               size: str = "1Gi") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": meta,
            "spec": {"source": {"http": {"url": url}},
                     "storage": {"resources": {"requests": {"storage": size}}}}}
