"""bench/http1.py, the benchmarks' lean HTTP/1.1 client, against a real aiohttp server on a local port."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from http1 import BlockingConnection, Client, HTTPError  # noqa: E402

BIG = bytes(range(256)) * (3 << 12)  # 3 MiB: several reads


async def _serve(handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    kind = request.match_info["tail"]
    if kind == "chunked":  # no length given: aiohttp sends chunks, one per write
        r = web.StreamResponse(headers={"X-Got": str(len(body))})
        await r.prepare(request)
        for i in range(0, len(BIG), 100_000):
            await r.write(BIG[i:i + 100_000])
        await r.write_eof()
        return r
    if kind == "close":
        return web.Response(body=b"bye", headers={"Connection": "close"})
    if kind == "oip":
        return web.Response(body=b'{"head":1}' + BIG, headers={"Inference-Header-Content-Length": "10"})
    return web.Response(status=201 if body else 200, body=body + BIG, headers={"X-Method": request.method})


def test_bodies_by_length_and_by_chunks_and_connections_reused():
    async def main():
        runner, port = await _serve(_echo)
        client = Client("127.0.0.1", port)
        try:
            r = await client.request("POST", "/plain", b"hello", {"X-Any": "1"})
            assert (r.status, r.headers["x-method"], r.body, r.body_bytes) == (201, "POST", b"hello" + BIG,
                                                                              len(BIG) + 5)
            r = await client.request("GET", "/chunked", b"abc")
            assert r.headers["transfer-encoding"] == "chunked"
            assert (r.status, r.headers["x-got"], r.body, r.body_bytes) == (200, "3", BIG, len(BIG))
            assert len(client._idle) == 1  # the one connection served both
            r = await client.request("GET", "/oip", keep_header="inference-header-content-length")
            assert (r.body, r.body_bytes) == (b'{"head":1}', len(BIG) + 10)  # the tensor bytes counted, not kept
            r = await client.request("GET", "/oip", keep_header="inference-header-content-length", keep_more=4)
            assert (r.body, r.body_bytes) == (b'{"head":1}' + BIG[:4], len(BIG) + 10)  # and the first of them
            r = await client.request("GET", "/close")
            assert r.body == b"bye" and client._idle == []  # a connection the server closes is not reused
            r = await client.request("GET", "/plain")
            assert r.body == BIG
        finally:
            client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_concurrent_requests_open_connections_of_their_own():
    async def main():
        runner, port = await _serve(_echo)
        client = Client("127.0.0.1", port)
        try:
            rs = await asyncio.gather(*(client.request("POST", "/x", str(i).encode()) for i in range(5)))
            assert [r.body[:1] for r in rs] == [str(i).encode() for i in range(5)]
            assert len(client._idle) == 5
        finally:
            client.close()
            await runner.cleanup()

    asyncio.run(main())


async def _cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that closes the connection in the middle of its response."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    await writer.drain()
    writer.close()


def test_a_connection_lost_mid_response_fails_that_request():
    async def main():
        server = await asyncio.start_server(_cut, "127.0.0.1", 0)
        client = Client("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(HTTPError, match="connection"):
                await client.request("GET", "/")
            assert client._idle == []
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_malformed_head_fails_that_request():
    async def main():
        async def bad(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SPDY/9 200 OK\r\n\r\n")
            await writer.drain()

        server = await asyncio.start_server(bad, "127.0.0.1", 0)
        client = Client("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(HTTPError, match="bad status line"):
                await client.request("GET", "/")
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_the_blocking_connection_reads_what_the_asyncio_client_reads_and_reconnects_after_a_close():
    def use(port: int) -> None:
        conn = BlockingConnection("127.0.0.1", port)
        try:
            r = conn.request("POST", "/plain", b"hello", {"X-Any": "1"})
            assert (r.status, r.headers["x-method"], r.body, r.body_bytes) == (201, "POST", b"hello" + BIG,
                                                                              len(BIG) + 5)
            first = conn.sock
            r = conn.request("GET", "/chunked", b"abc")
            assert (r.headers["x-got"], r.body) == ("3", BIG) and conn.sock is first  # kept alive
            r = conn.request("GET", "/oip", keep_header="inference-header-content-length")
            assert (r.body, r.body_bytes) == (b'{"head":1}', len(BIG) + 10)
            assert conn.request("GET", "/close").body == b"bye" and conn.sock is None
            assert conn.request("GET", "/plain").body == BIG  # on a new connection
        finally:
            conn.close()

    async def main():
        runner, port = await _serve(_echo)
        try:
            await asyncio.get_running_loop().run_in_executor(None, use, port)  # the server stays on this loop
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_the_blocking_connection_fails_a_request_whose_connection_is_lost_mid_response():
    async def main():
        server = await asyncio.start_server(_cut, "127.0.0.1", 0)
        conn = BlockingConnection("127.0.0.1", server.sockets[0].getsockname()[1], timeout=10)
        try:
            with pytest.raises(HTTPError, match="connection closed"):
                await asyncio.get_running_loop().run_in_executor(None, conn.request, "GET", "/")
            assert conn.sock is None
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_client_of_a_url():
    c = Client.of("http://127.0.0.1:8123")
    assert (c.host, c.port) == ("127.0.0.1", 8123)
