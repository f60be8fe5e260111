"""A request body with a Content-Length, taken from the client's transport into a reused buffer.

aiohttp hands a handler the body through its HTTP parser and ``StreamReader``:
asyncio's TLS layer decrypts each record into a new ``bytes`` of 256 KiB
(shrunk to the record), joins the records of one read, the parser copies the
body out of that, and ``readany`` joins what is queued.  For a disk image
that is three or four copies and as many allocations of every byte, which is
what made the proxied upload slower than the direct one (``bench/upload.py``,
``docs/performance.md``).

Once the handler has the headers, and the body's length is known, ``Tap``
takes the connection from aiohttp's protocol with the transport's public
``set_protocol``: as an ``asyncio.BufferedProtocol`` it has the TLS layer
decrypt straight into its buffer, and each piece goes to the upstream
transport as it is.  What aiohttp had already parsed (``read_nowait``) is sent
first; exactly Content-Length bytes follow; then aiohttp's protocol gets its
connection back and the request's stream is ended, so aiohttp does not wait
for the rest of the body.  A tap stopped before the end (the upload server
answered early or went away) keeps the connection and drops what the client
still sends; the request's stream ends where the body ends, so aiohttp's
lingering close (which waits for that, up to its ``lingering_time``) lets the
client send its last bytes and read the answer, as for any body a handler
left unread.  Either way aiohttp's parser has lost count of the connection,
so it must not carry another request: the request is marked
(``TAPPED``), and each answer the proxy makes for it, relayed or an error,
passes through ``closing``, which says ``Connection: close`` and has aiohttp
close the connection after it.

Backpressure: when the upstream transport holds more than ``high_water``
bytes the client's transport stops reading until the upstream has drained,
so the client's TCP window closes as with aiohttp's own flow control.  The
buffer is reused only while the upstream transport holds none of it (some
Python versions keep a view of unsent data rather than a copy); otherwise a
new one is taken.  A connection that ends early (EOF or loss) fails the body
with ``BodyBroken``, and the loss is passed on to aiohttp's protocol so that
it cleans up as it would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

__all__ = ["BUFFER_SIZE", "TAPPED", "BodyBroken", "Tap", "can_tap", "closing"]

TAPPED = web.RequestKey("uploadproxy.tapped", bool)
"""Set on a request whose body was tapped: its connection closes after the answer."""

BUFFER_SIZE = 256 * 1024
"""Bytes the TLS layer may decrypt into the buffer at once (one read of the socket)."""


class BodyBroken(Exception):
    """The client's connection ended before the whole body arrived."""


def can_tap(request: web.Request) -> bool:
    """Whether REQUEST's body can be tapped: a known length, and a transport to take."""
    transport = request.transport
    return (request.content_length is not None and request.content_length > 0
            and transport is not None and not transport.is_closing()
            and isinstance(transport, asyncio.ReadTransport))


_Response = TypeVar("_Response", bound=web.StreamResponse)


def closing(request: web.Request, response: _Response) -> _Response:
    """RESPONSE, closing the connection after it if REQUEST's body was tapped.

    Call before the response is prepared: aiohttp writes the Connection
    header before the ``on_response_prepare`` signals run.
    """
    if request.get(TAPPED):
        response.force_close()
    return response


class Tap(asyncio.BufferedProtocol):
    """Moves the rest of a request's body to UPSTREAM; run it with ``pump``."""

    def __init__(self, request: web.Request, upstream: asyncio.WriteTransport, *,
                 high_water: int, on_bytes: Callable[[int], None]) -> None:
        assert request.transport is not None and request.content_length is not None
        self._request = request
        self._client = request.transport
        self._upstream = upstream
        self._high_water = high_water
        self._on_bytes = on_bytes
        self._left = request.content_length
        self._buffer = memoryview(bytearray(BUFFER_SIZE))
        self._event = asyncio.Event()
        self._error: BaseException | None = None
        self._ended = False  # the client's connection: EOF or lost
        self._waiting_for_upstream = False
        self._original: asyncio.BaseProtocol | None = None  # aiohttp's, while discarding

    # -- asyncio.BufferedProtocol: called by the client's transport ----------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._original is not None:
            self._drop(nbytes)
            return
        if self._left <= 0 or self._error is not None:
            return  # past the body (a pipelined request): the connection closes after the answer
        n = min(nbytes, self._left)
        if self._upstream.is_closing():
            self._fail(ConnectionResetError("the upload server closed the connection"))
            return
        self._upstream.write(self._buffer[:n])
        self._left -= n
        self._on_bytes(n)
        if self._upstream.get_write_buffer_size():
            # The transport may keep a view of what it could not send: never reuse it.
            self._buffer = memoryview(bytearray(BUFFER_SIZE))
        if self._left == 0:
            self._client.pause_reading()
            self._event.set()
        elif self._upstream.get_write_buffer_size() > self._high_water:
            self._client.pause_reading()
            self._waiting_for_upstream = True
            self._event.set()

    def eof_received(self) -> bool | None:
        self._ended = True
        self._fail(BodyBroken(f"the client ended the connection {self._left} bytes "
                              "before the end of the body"))
        if self._original is not None:
            self._request.content.feed_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._fail(BodyBroken(f"the client's connection was lost {self._left} bytes before "
                              f"the end of the body: {exc or 'closed'}"))
        if self._original is not None:
            self._request.content.feed_eof()
            self._original.connection_lost(exc)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._event.set()

    def _drop(self, nbytes: int) -> None:
        """Discarding: count the body down; its end ends aiohttp's stream."""
        if self._left > 0:
            self._left -= min(nbytes, self._left)
            if self._left == 0:
                self._request.content.feed_eof()

    # -- the caller's side --------------------------------------------------------

    async def pump(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Send the body on; DRAIN is the upstream writer's ``drain``.

        Returns once the whole body is in the upstream transport (not yet
        necessarily on the wire: the caller drains); raises ``BodyBroken``
        or the upstream's error.  Cancelled or failed before the end of the
        body on a live connection, the tap stays and drops the rest (see the
        module's docstring); otherwise aiohttp's protocol has the connection
        back.
        """
        content = self._request.content
        early = content.read_nowait()  # parsed by aiohttp before we took over
        if early:
            self._upstream.write(early)
            self._left -= len(early)
            self._on_bytes(len(early))
        if self._left <= 0:
            return
        original = self._client.get_protocol()
        self._request[TAPPED] = True
        self._client.set_protocol(self)
        try:
            self._client.resume_reading()
            while True:
                await self._event.wait()
                self._event.clear()
                if self._error is not None:
                    raise self._error
                if self._left == 0:
                    return
                if self._waiting_for_upstream:
                    await drain()
                    self._waiting_for_upstream = False
                    self._client.resume_reading()
        finally:
            if self._left == 0 or self._ended:
                self._client.set_protocol(original)
                content.feed_eof()  # nothing more will come for aiohttp
                if self._ended:
                    # The end went to this protocol; aiohttp's must clean up too.
                    original.connection_lost(None)
            else:
                self._original = original
                self._client.resume_reading()
