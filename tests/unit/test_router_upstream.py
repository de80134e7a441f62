"""The router's HTTP/1.1 client for the pods (router/airfleet_router/upstream.py), against a
scripted server on loopback: what it sends, the response framings it reads (Content-Length,
chunked, up to the end of the connection, after a 100 Continue), keep-alive reuse and expiry,
and its errors (refused, silent, broken off, unparsable)."""

from __future__ import annotations

import asyncio

import pytest

import tests.router_support  # noqa: F401 (puts router/ on sys.path)

# isort: off
from airfleet_router.discovery import Endpoint
from airfleet_router.upstream import UpstreamConnectError, UpstreamError, UpstreamPool
# isort: on


class Script:
    """A server answering each request with the next of ``answers``: bytes to send, a float
    to sleep, or None to close the connection. Records each request's bytes and how many
    connections it accepted."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                for step in self.answers.pop(0):
                    if step is None:
                        writer.close()
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(script: Script, client, **pool_args) -> None:
    async def main():
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        port = script.port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(Endpoint("127.0.0.1", port), **{
            "connect_timeout": 1.0, "read_timeout": 1.0, "keepalive": 4.0, **pool_args})
        try:
            await client(pool)
        finally:
            await pool.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\nX-A: 2\r\n\r\nhi"


def test_request_bytes_headers_as_sent_and_keep_alive_reuse():
    script = Script([OK], [OK])

    async def client(pool):
        for _ in range(2):
            response = await pool.post(b"/v1/completions?x=1",
                                       [(b"authorization", b"Bearer t")], b'{"a":1}')
            assert response.status == 200
            assert response.raw_headers == [(b"content-length", b"2"), (b"x-a", b"1"),
                                            (b"X-A", b"2")]
            assert response.header(b"x-a") == b"1"
            assert await response.read() == b"hi"

    run(script, client)
    assert script.connections == 1
    assert script.requests[0] == (
        b"POST /v1/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"authorization: Bearer t\r\ncontent-length: 7\r\n\r\n{\"a\":1}" % script.port)


def test_idle_connection_is_closed_after_its_keep_alive():
    script = Script([OK], [OK])

    async def client(pool):
        await (await pool.post(b"/", [], b"")).read()
        assert pool.sweep() == 0
        await asyncio.sleep(0.1)
        assert pool.sweep() == 1  # what the router's prune task does every 30 s
        await (await pool.post(b"/", [], b"")).read()

    run(script, client, keepalive=0.05)
    assert script.connections == 2


def test_chunked_body_arrives_as_it_is_sent():
    script = Script([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                     b"content-type: text/event-stream\r\n\r\n",
                     b"5\r\ndata1\r\n", 0.05, b"5\r\ndata2\r\n", 0.05, b"0\r\n\r\n"], [OK])

    async def client(pool):
        response = await pool.post(b"/", [], b"")
        assert [chunk async for chunk in response.chunks()] == [b"data1", b"data2"]
        assert response.complete
        await (await pool.post(b"/", [], b"")).read()  # the connection was reused

    run(script, client)
    assert script.connections == 1


def test_body_up_to_the_end_of_the_connection():
    script = Script([b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", b"all of it", None])

    async def client(pool):
        assert await (await pool.post(b"/", [], b"")).read() == b"all of it"

    run(script, client)


def test_100_continue_is_skipped():
    script = Script([b"HTTP/1.1 100 Continue\r\n\r\n", OK])

    async def client(pool):
        response = await pool.post(b"/", [], b"")
        assert (response.status, await response.read()) == (200, b"hi")

    run(script, client)


def test_connection_refused_is_a_connect_error():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = UpstreamPool(Endpoint("127.0.0.1", port), connect_timeout=1.0,
                            read_timeout=1.0, keepalive=4.0)
        with pytest.raises(UpstreamConnectError):
            await pool.post(b"/", [], b"")

    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    [0.5, OK],  # silent before the headers
    [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", 0.5, b"cd"],  # silent mid-body
])
def test_silence_longer_than_the_read_timeout(answer):
    async def client(pool):
        with pytest.raises(TimeoutError):
            response = await pool.post(b"/", [], b"")
            await response.read()

    run(Script(answer), client, read_timeout=0.2)


@pytest.mark.parametrize("answer", [
    [None],  # closed before answering
    [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab", None],  # broken off
    [b"NOT HTTP AT ALL\r\n\r\n"],  # unparsable
])
def test_broken_responses_are_upstream_errors(answer):
    async def client(pool):
        with pytest.raises(UpstreamError):
            response = await pool.post(b"/", [], b"")
            await response.read()

    run(Script(answer), client)


def test_a_response_dropped_unread_closes_its_connection():
    script = Script([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab", 1.0], [OK])

    async def client(pool):
        response = await pool.post(b"/", [], b"")
        response.close()
        await (await pool.post(b"/", [], b"")).read()

    run(script, client)
    assert script.connections == 2
