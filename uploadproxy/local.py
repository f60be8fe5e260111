"""The hop to an upload server on this machine: its Unix socket, plain HTTP, a lean body pump.

In ``cdi serve`` the upload server is a worker on the same machine, running
as the same user, and the resolver hands out its Unix socket
(``UploadTarget.socket``; why no TLS is needed there is in
``importer.upload.localsocket`` and ``docs/security.md``).  Leaving TLS off
this hop halves the cryptography of an upload: the proxy decrypts the
client's TLS and nothing else, and the upload server reads plain bytes.

The body is pumped here rather than through ``aiohttp.ClientSession``: each
piece the client's stream holds (``readany``, up to the whole buffer at once)
goes straight to the upstream transport, whose socket has a large send buffer,
and the pump waits only when more than ``HIGH_WATER`` bytes are queued.
Backpressure is unchanged: while the pump waits it does not read, aiohttp
stops reading the client's socket once its buffer is full, and the client's
TCP window closes.  What the proxy holds per upload is bounded by the
client-side buffer plus ``HIGH_WATER``.

The upload server's answer (status line, headers, body by Content-Length,
chunked or up to the end of the connection) is read with a small parser: it
is our own server's answer, and it comes back to the client unchanged, as in
``forward``.  An answer that arrives while the body is still being sent (a
refusal after the first bytes) stops the pump and is relayed.  Failures map
to the same errors as ``forward``: 502 unreachable, 502 closed before
answering, the client's connection cut if the answer breaks midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import urllib.parse

from aiohttp import web

from uploadproxy import errors, metrics, tap

__all__ = ["HIGH_WATER", "relay"]

log = logging.getLogger(__name__)

SNDBUF = 4 * 1024 * 1024
"""Send buffer asked for the upstream socket (the kernel may cap it at ``wmem_max``)."""

HIGH_WATER = 4 * 1024 * 1024
"""Bytes queued in the upstream transport beyond which the pump waits for it to drain."""

HEAD_LIMIT = 64 * 1024
"""Largest status line plus headers accepted from the upload server."""

CONNECT_TIMEOUT = 10.0
EARLY_ANSWER_WAIT = 5.0
"""Seconds to wait for an answer after the upload server stopped taking the body."""

_ANSWER_CHUNK = 64 * 1024
_SAFE_TARGET = "/?&=%:+,;@!$'()*~-._"

# RFC 9110 section 7.6.1, plus what the response writer sets itself.
_NOT_RELAYED = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Content-Length", "Date", "Server",
))


class _BadAnswer(Exception):
    """The upload server's answer is not HTTP/1.x as we speak it."""


class _ClientBroke(Exception):
    """Reading the client's body failed: it went away, or sent less than it announced."""


class _Counter:
    def __init__(self) -> None:
        self.count = 0


async def relay(request: web.Request, *, socket_path: str, path: str, namespace: str, pvc: str,
                headers: list[tuple[str, str]], timeout: float) -> web.StreamResponse:
    """Send REQUEST to the upload server listening on SOCKET_PATH; relay its answer.

    HEADERS are the request headers to forward (already chosen by the caller).
    """
    where = f"unix:{socket_path}"
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(socket_path, limit=HEAD_LIMIT), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        log.warning("UNREACHABLE namespace=%s pvc=%s upstream=%s error=%r", namespace, pvc,
                    where, e)
        raise errors.UpstreamUnreachable(namespace=namespace, pvc=pvc) from e
    body = _Counter()
    try:
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                       SNDBUF)
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)
        async with asyncio.timeout(timeout):
            response = await _exchange(request, reader, writer, path, headers, body,
                                       namespace=namespace, pvc=pvc, where=where)
    except TimeoutError as e:
        log.warning("UPSTREAM-TIMEOUT namespace=%s pvc=%s upstream=%s sent=%d", namespace, pvc,
                    where, body.count)
        raise errors.UpstreamClosed(namespace=namespace, pvc=pvc) from e
    finally:
        writer.transport.abort()  # one request per connection; the answer has been read
    log.info("PROXIED method=%s path=%s upstream=%s upstream_path=%s namespace=%s pvc=%s "
             "status=%d bytes=%d seconds=%.3f", request.method, request.path, where, path,
             namespace, pvc, response.status, body.count, time.monotonic() - started)
    return response


def _head(request: web.Request, path: str, headers: list[tuple[str, str]], chunked: bool
          ) -> bytes:
    target = urllib.parse.quote(path, safe=_SAFE_TARGET)
    if request.rel_url.raw_query_string:
        target += "?" + urllib.parse.quote(request.rel_url.raw_query_string, safe=_SAFE_TARGET)
    lines = [f"{request.method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    for name, value in headers:
        if any(c in value for c in "\r\n\0"):
            continue  # cannot occur after aiohttp's parser; never let it split a header
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _exchange(request: web.Request, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, path: str, headers: list[tuple[str, str]],
                    body: _Counter, *, namespace: str, pvc: str, where: str
                    ) -> web.StreamResponse:
    has_body = request.body_exists
    chunked = has_body and request.content_length is None
    writer.write(_head(request, path, headers, chunked))
    answer = asyncio.ensure_future(_read_head(reader))
    pump = asyncio.ensure_future(_pump(request, writer, chunked, body)) if has_body else None
    try:
        if pump is not None:
            await asyncio.wait({answer, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and pump.exception() is not None:
                if isinstance(pump.exception(), _ClientBroke):
                    raise errors.ClientGone() from pump.exception()
                # The upload server stopped reading: it may have answered (a refusal).
                done, _ = await asyncio.wait({answer}, timeout=EARLY_ANSWER_WAIT)
                if not done:
                    raise ConnectionResetError(f"sending the body failed: {pump.exception()!r}")
            elif not pump.done():
                log.info("ANSWER early namespace=%s pvc=%s after %d bytes", namespace, pvc,
                         body.count)
                pump.cancel()
        status, reason, answer_headers = await answer
    except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            asyncio.InvalidStateError, _BadAnswer) as e:
        log.warning("UPSTREAM-CLOSED namespace=%s pvc=%s upstream=%s sent=%d error=%r",
                    namespace, pvc, where, body.count, e)
        raise errors.UpstreamClosed(namespace=namespace, pvc=pvc) from e
    finally:
        for task in (pump, answer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    return await _relay_answer(request, reader, status, reason, answer_headers,
                               namespace=namespace, pvc=pvc, where=where)


async def _pump(request: web.Request, writer: asyncio.StreamWriter, chunked: bool,
                body: _Counter) -> None:
    """Move the client's body to the upstream transport, waiting above HIGH_WATER.

    A body with a Content-Length is taken from the client's transport by
    ``tap`` (no copies on the way); a chunked one comes through aiohttp's
    parser and goes on re-chunked.
    """
    content = request.content
    transport = writer.transport
    if not chunked and tap.can_tap(request):
        def count(n: int) -> None:
            body.count += n
            metrics.BYTES.inc(n)

        try:
            await tap.Tap(request, transport, high_water=HIGH_WATER, on_bytes=count).pump(
                writer.drain)
        except tap.BodyBroken as e:
            raise _ClientBroke(str(e)) from e
        await writer.drain()
        return
    while True:
        try:
            # One piece as aiohttp received it: readany() would join what is
            # queued into a new object, a copy of every byte for nothing.
            chunk, http_chunk_end = await content.readchunk()
        except Exception as e:
            raise _ClientBroke(str(e)) from e
        if not chunk:
            if http_chunk_end:
                continue  # the end of one of the client's HTTP chunks, not of the body
            break
        body.count += len(chunk)
        metrics.BYTES.inc(len(chunk))
        if transport.is_closing():
            raise ConnectionResetError("the upload server closed the connection")
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        if transport.get_write_buffer_size() > HIGH_WATER:
            await writer.drain()
    if chunked:
        transport.write(b"0\r\n\r\n")
    await writer.drain()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, list[tuple[str, str]]]:
    """Status, reason and headers of the answer (1xx interim answers are skipped)."""
    while True:
        data = await reader.readuntil(b"\r\n\r\n")
        lines = data[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _BadAnswer(f"bad status line {lines[0][:80]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadAnswer(f"bad header line {line[:80]!r}")
            headers.append((name, value.strip()))
        status = int(code)
        if not 100 <= status < 200:
            return status, reason, headers


async def _relay_answer(request: web.Request, reader: asyncio.StreamReader, status: int,
                        reason: str, headers: list[tuple[str, str]], *, namespace: str,
                        pvc: str, where: str) -> web.StreamResponse:
    """Copy the answer to the client; cut the client off if it breaks midway."""
    response = tap.closing(request, web.StreamResponse(status=status, reason=reason or None))
    length: int | None = None
    chunked = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length" and value.isdigit():
            length = int(value)
        elif lower == "transfer-encoding":
            chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
        if lower not in _NOT_RELAYED:
            response.headers.add(name, value)
    no_body = request.method == "HEAD" or status in (204, 304)
    if length is not None and status not in (204, 304):
        response.content_length = length  # a HEAD answer keeps the length it announces
    await response.prepare(request)
    try:
        if no_body:
            pass
        elif chunked:
            await _copy_chunked(reader, response)
        else:
            await _copy(reader, response, length)
    except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            _BadAnswer) as e:
        if isinstance(e, ConnectionError) and (request.transport is None
                                               or request.transport.is_closing()):
            return response  # the client left while we were writing its answer
        log.warning("UPSTREAM-CLOSED-ANSWER namespace=%s pvc=%s upstream=%s error=%r",
                    namespace, pvc, where, e)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def _copy(reader: asyncio.StreamReader, response: web.StreamResponse,
                length: int | None) -> None:
    left = length
    while left is None or left > 0:
        data = await reader.read(_ANSWER_CHUNK if left is None else min(left, _ANSWER_CHUNK))
        if not data:
            if left is None:
                return  # delimited by the end of the connection
            raise asyncio.IncompleteReadError(b"", left)
        if left is not None:
            left -= len(data)
        await response.write(data)


async def _copy_chunked(reader: asyncio.StreamReader, response: web.StreamResponse) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadAnswer(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return
        await _copy(reader, response, size)
        if await reader.readexactly(2) != b"\r\n":
            raise _BadAnswer("a chunk is longer than its size")
