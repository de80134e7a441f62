"""The router's HTTP/1.1 client for the pods: keep-alive connections per pod, one ``send()``
per request, responses parsed by httptools (llhttp, the parser uvicorn uses on our side).

Why not aiohttp (which the router used before): a proxied request needs none of a general
client's work (URL parsing and quoting, cookie jars, header multidicts, tracing signals, a
task to write the body), and that work was most of the router's own CPU with 32 requests in
flight. Here a request is one pre-built bytes object written to a pooled connection, and the
response is handed over as its status, its raw header lines and its body chunks.

Semantics kept from the aiohttp client: no cap on connections per pod (the engine queues
requests itself); idle connections are reused for ``keepalive`` seconds at most (below the 5 s
of the engines' uvicorn, so we do not reuse a connection the pod is closing at that very
moment); connecting is bounded by ``connect_timeout`` and raises :class:`UpstreamConnectError`
(nothing was sent: another pod may be tried); ``read_timeout`` bounds every silence of the
pod, before its response headers and between body chunks (:class:`TimeoutError`); a pod that
closes the connection or sends something unparsable raises :class:`UpstreamError`. Bodies are
relayed as sent (no decompression); only ``Host`` and ``Content-Length`` are added to the
client's headers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools

from airfleet_router.discovery import Endpoint

# Reading from a pod pauses while this much of its response waits for a slow client, and
# resumes below the low mark: a fast pod cannot fill the router's memory.
PAUSE_ABOVE = 256 * 1024
RESUME_BELOW = 64 * 1024


class UpstreamError(Exception):
    """The pod broke off its response or sent one that does not parse."""


class UpstreamConnectError(Exception):
    """The pod could not be reached: nothing was sent."""


class UpstreamResponse:
    """One response: ``status`` and ``raw_headers`` (name and value bytes as sent, repeated
    ones kept) once :meth:`start` returns, then the body through :meth:`read` or
    :meth:`chunks`. :meth:`close` drops the connection if the body was not read to its end."""

    __slots__ = ("status", "raw_headers", "_conn", "_loop", "_timeout", "_chunks", "_size",
                 "_started", "_done", "_error", "_waiter", "_until_close")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._conn: _Connection | None = conn
        self._loop = loop
        self._timeout = timeout
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._started = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._until_close = False  # neither Content-Length nor chunked: the body ends at EOF

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return None

    @property
    def complete(self) -> bool:
        return self._done

    async def start(self) -> None:
        """Wait for the status line and headers."""
        while not self._started:
            await self._progress()

    async def read(self) -> bytes:
        """The whole body."""
        while not self._done:
            await self._progress()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (what has arrived since the last chunk, joined)."""
        while True:
            if self._chunks:
                chunk = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._taken()
                yield chunk
            elif self._done:
                return
            else:
                await self._progress()

    def close(self) -> None:
        """Drop the connection unless the response was complete (it is back in the pool)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    # ---- fed by the connection -----------------------------------------------------------

    async def _progress(self) -> None:
        """Wait for news from the connection, at most the read timeout."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None and not self._chunks:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _headers(self, status: int, until_close: bool) -> None:
        self.status = status
        self._until_close = until_close
        self._started = True
        self._wake()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > PAUSE_ABOVE and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _taken(self) -> None:
        if self._size > PAUSE_ABOVE and self._conn is not None:
            self._conn.resume()
        self._size = 0

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._until_close and self._started and not self._done:
            self._finish()  # a body delimited by the end of the connection: complete
            return
        if not self._done and self._error is None:
            self._error = error
            self._wake()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection to a pod; the parser's callbacks feed the current response."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_until = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._informational = False
        self._paused = False

    # asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is not reusable
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            response = self.response
            self.abort()
            if response is not None:
                response._fail(UpstreamError(f"unparsable response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._discard(self)
        response, self.response = self.response, None
        if response is not None:
            response._fail(UpstreamError("the pod closed the connection"))

    # httptools
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        response = self.response
        if response is None:
            return
        if 100 <= status < 200:  # 100 Continue and the like: the real response follows
            self._informational = True
            response.raw_headers.clear()
            return
        until_close = True
        for name, value in response.raw_headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding"
                                                 and b"chunked" in value.lower()):
                until_close = False
                break
        response._headers(status, until_close)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response, self.response = self.response, None
        keep = self._parser.should_keep_alive() and not self.lost
        if response is not None:
            response._finish()
        if keep:
            self.resume()
            self.pool._put(self)
        else:
            self.abort()

    # ours
    def send(self, response: UpstreamResponse, data: bytes) -> None:
        self.response = response
        self.transport.write(data)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.response = None
        if self.transport is not None and not self.lost:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one pod; the most recently used idle connection first."""

    def __init__(self, endpoint: Endpoint, *, connect_timeout: float, read_timeout: float,
                 keepalive: float) -> None:
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        host = f"[{endpoint.ip}]" if ":" in endpoint.ip else endpoint.ip
        self._host = f"{host}:{endpoint.port}".encode("ascii")
        self._idle: list[_Connection] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the first request's

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def post(self, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> UpstreamResponse:
        """POST ``body`` to ``target`` (path and query) with ``headers``; returns once the
        response's headers are in. Raises :class:`UpstreamConnectError` (nothing sent),
        :class:`TimeoutError` (no response in time) or :class:`UpstreamError`."""
        loop = self._loop
        if loop is None:  # looked up once: on Python 3.11 every look-up calls getpid()
            loop = self._loop = asyncio.get_running_loop()
        conn = self._take()
        if conn is None:
            conn = await self._connect(loop)
        response = UpstreamResponse(conn, loop, self._read_timeout)
        head = [b"POST ", target, b" HTTP/1.1\r\nhost: ", self._host, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"content-length: ", b"%d" % len(body), b"\r\n\r\n", body)
        conn.send(response, b"".join(head))
        try:
            await response.start()
        except BaseException:
            response.close()
            raise
        return response

    def _take(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.lost and conn.idle_until > now and not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.endpoint.ip, self.endpoint.port)
        except (OSError, TimeoutError) as e:
            raise UpstreamConnectError(type(e).__name__) from e
        return conn

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        now = time.monotonic()
        conn.idle_until = now + self._keepalive
        idle = self._idle
        idle.append(conn)
        if idle[0].idle_until <= now:  # the longest idle ones (at the bottom) have expired
            self.sweep(now)

    def sweep(self, now: float | None = None) -> int:
        """Close the idle connections past their keep-alive; how many."""
        now = time.monotonic() if now is None else now
        expired = [conn for conn in self._idle if conn.idle_until <= now]
        if expired:
            self._idle = [conn for conn in self._idle if conn.idle_until > now]
            for conn in expired:
                conn.abort()
        return len(expired)

    def _discard(self, conn: _Connection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their response is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
