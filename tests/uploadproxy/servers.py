"""Real servers for the proxy tests: an aiohttp app on its own loop thread, a stand-in upload
server, and a dict-backed resolver.

pytest-asyncio is not used: each server owns an event loop running in a
background thread, and the tests talk to it over real sockets with
``requests``, as clients would.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from uploadproxy.resolver import NotUploadTarget, UploadTarget

T = TypeVar("T")


class ServerThread:
    """An aiohttp ``Application`` served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None,
                 name: str = "server", unix_path: Path | None = None) -> None:
        self._app = app
        self._ssl = ssl_context
        self._unix_path = unix_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>``, or ``unix:<path>`` (see :func:`target`)."""
        if self._unix_path is not None:
            return f"unix:{self._unix_path}"
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def call(self, coro: Awaitable[T], timeout: float = 30) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        async def wrapper() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = self.call(self._start())
        return self

    async def _start(self) -> int:
        self._runner = web.AppRunner(self._app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        if self._unix_path is not None:
            await web.UnixSite(self._runner, str(self._unix_path)).start()
            return 0
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        address = self._runner.addresses[0]
        return int(address[1])

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
        # As asyncio.run does: a connection still lingering (aiohttp's lingering
        # close of an unread body) is cancelled, not destroyed with the loop.
        self.call(_cancel_the_rest())
        self.call(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Seen:
    """One request as the stand-in upload server received it."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    size: int = 0
    sha256: str = ""
    complete: bool = False
    peer_cn: str | None = None


@dataclass
class Upstream:
    """A stand-in upload server that records requests and streams bodies to files.

    Behaviour for the next requests is set on the attributes: ``answer`` is
    sent after the body has been read; ``early`` is sent without reading it
    (CDI's "busy" 503); ``close_after`` drops the connection once that many
    body bytes arrived; ``pause`` sleeps once, ``(after_bytes, seconds)``.
    """

    spool: Path
    answer: tuple[int, str] = (200, "upload ok")
    early: tuple[int, str] | None = None
    close_after: int | None = None
    pause: tuple[int, float] | None = None
    offset_answer: str = '{"offset": 0}'
    cut_answer: bool = False
    chunked_answer: bytes | None = None  # sent in the chunked coding, in pieces
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.path, request.rel_url.raw_query_string,
                    CIMultiDict(request.headers), peer_cn=_peer_cn(request))
        self.seen.append(seen)
        if request.method == "HEAD":
            return web.Response(status=200)
        if request.path.endswith("/upload-offset"):
            return web.Response(text=self.offset_answer, content_type="application/json")
        if self.early is not None:
            status, text = self.early
            return web.Response(status=status, text=text)
        await self._read_body(request, seen)
        if not seen.complete:
            return web.Response(status=400, text="short body")
        if self.cut_answer:
            response = web.StreamResponse()
            response.content_length = 1000
            await response.prepare(request)
            await response.write(b"partial answer")
            assert request.transport is not None
            request.transport.abort()
            return response
        if self.chunked_answer is not None:
            response = web.StreamResponse(status=201, reason="Made It")
            response.enable_chunked_encoding()
            response.headers["X-Answer"] = "chunked"
            await response.prepare(request)
            for i in range(0, len(self.chunked_answer), 7000):
                await response.write(self.chunked_answer[i : i + 7000])
            await response.write_eof()
            return response
        status, text = self.answer
        return web.Response(status=status, text=text)

    async def _read_body(self, request: web.Request, seen: Seen) -> None:
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256()
        paused = False
        path = self.spool / f"{len(self.seen)}.body"
        with path.open("wb") as f:
            try:
                async for chunk in request.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                    seen.size += len(chunk)
                    await loop.run_in_executor(None, f.write, chunk)
                    if self.close_after is not None and seen.size >= self.close_after:
                        assert request.transport is not None
                        request.transport.abort()
                        return
                    if self.pause is not None and not paused and seen.size >= self.pause[0]:
                        paused = True
                        await asyncio.sleep(self.pause[1])
            except Exception as e:  # connection reset, aiohttp's payload errors
                seen.sha256 = f"failed: {e!r}"
                return
        seen.sha256 = digest.hexdigest()
        seen.complete = True


def _peer_cn(request: web.Request) -> str | None:
    transport = request.transport
    cert: Any = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def target(url: str, content_type: str = "kubevirt") -> UploadTarget:
    """The resolver's answer for a stand-in at URL: a base URL, or ``unix:<socket path>``."""
    if url.startswith("unix:"):
        return UploadTarget("https://127.0.0.1:1", content_type=content_type,
                            socket=url.removeprefix("unix:"))
    return UploadTarget(url, content_type=content_type)


Answer = UploadTarget | None | BaseException


class DictResolver:
    """A Resolver backed by a dict: ``answers[(ns, pvc)]`` is a list of answers given in turn
    (the last one repeats); an exception in the list is raised.  Unknown PVCs do not exist."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[Answer]] = {}
        self.calls: list[tuple[str, str]] = []

    def set(self, namespace: str, pvc: str, *answers: Answer) -> None:
        self.answers[(namespace, pvc)] = list(answers)

    async def upload_server(self, namespace: str, pvc: str) -> UploadTarget | None:
        self.calls.append((namespace, pvc))
        answers = self.answers.get((namespace, pvc))
        if not answers:
            raise NotUploadTarget(f"rejecting Upload Request for PVC {pvc} that doesn't exist")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer
