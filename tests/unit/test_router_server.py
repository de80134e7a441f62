"""The router's uvicorn protocol (router/airfleet_router/server.py): a response's head and
its first body write leave in one ``send()``; a head with no body at once still leaves within
the event loop's next iteration."""

from __future__ import annotations

import asyncio

import tests.router_support  # noqa: F401 (puts router/ on sys.path)

# isort: off
from airfleet_router.server import _CoalescingWriter, http_protocol
# isort: on


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str):
        return name


def test_head_and_body_in_one_write_then_writes_as_they_come():
    async def main():
        transport = Transport()
        writer = _CoalescingWriter(transport, asyncio.get_running_loop())
        writer.write(b"HEAD")
        writer.write(b"body")
        writer.write(b"more")
        await asyncio.sleep(0)
        assert transport.writes == [b"HEADbody", b"more"]
        assert writer.get_extra_info("peername") == "peername"

    asyncio.run(main())


def test_a_head_alone_leaves_at_the_next_iteration_or_on_close():
    async def main():
        transport = Transport()
        writer = _CoalescingWriter(transport, asyncio.get_running_loop())
        writer.write(b"HEAD")
        assert transport.writes == []
        await asyncio.sleep(0)
        assert transport.writes == [b"HEAD"]
        writer.write(b"chunk")
        assert transport.writes == [b"HEAD", b"chunk"]

        transport = Transport()
        writer = _CoalescingWriter(transport, asyncio.get_running_loop())
        writer.write(b"HEAD")
        writer.close()
        assert (transport.writes, transport.closed) == ([b"HEAD"], True)
        await asyncio.sleep(0)
        assert transport.writes == [b"HEAD"]

    asyncio.run(main())


def test_the_protocol_is_uvicorns_httptools_one():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(http_protocol(), HttpToolsProtocol)
