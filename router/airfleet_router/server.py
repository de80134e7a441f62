"""uvicorn's httptools protocol, writing a response's head and the start of its body in one
``send()``.

uvicorn writes the status line and headers as soon as the application sends
``http.response.start``, then each body message: two system calls (and two TCP segments the
client wakes up for) for every buffered answer. :class:`CoalescingHttpToolsProtocol` holds the
head until the first body write of the same response, or until the event loop's next
iteration when no body follows at once (a stream whose first chunk is not there yet), so a
streamed response's head reaches the client no later than before.

:func:`http_protocol` gives uvicorn's default ("auto") where httptools is not installed.
"""

from __future__ import annotations

import asyncio


class _CoalescingWriter:
    """The transport as one response cycle sees it: its first write is held briefly."""

    __slots__ = ("_transport", "_loop", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
        elif self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def http_protocol() -> type[asyncio.Protocol] | str:
    """The protocol class for ``uvicorn.Config(http=...)``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11 implementation, as it is
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            # The cycle's task has not run yet (it was only scheduled), nor written anything.
            if cycle is not None and not cycle.response_started:
                cycle.transport = _CoalescingWriter(self.transport, self.loop)

    return CoalescingHttpToolsProtocol
