"""The gateway's fast path (:mod:`swapserve.gateway.fast`) over raw sockets: which heads it answers itself, requests
pipelined and arriving byte by byte, connections handed to aiohttp mid-stream, ``Connection: close``.

Answers served by the fast path carry no ``Server`` header; aiohttp's do: that is how these tests tell which
of the two answered. (``test_gateway.py`` runs every gateway scenario through the fast path as well.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from swapserve.gateway import GatewayConfig, make_app
from swapserve.gateway import fast
from swapserve.gateway.fast import MAX_HEAD, parse_head
from tiny_node import FastTestServer, TinyNode

X = [[0.5, -1.0, 2.0, 0.25]]
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}]}).encode()


def infer_head(name: str = "linear", body: bytes = BODY, extra: str = "") -> bytes:
    return (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


Response = tuple[int, dict[str, str], bytes]


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    return status, headers, await reader.readexactly(int(headers["content-length"]))


LOOP = "asyncio"
"""The event loop ``serve`` runs on (set per test by the ``loop`` fixture)."""


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Any:
    """Every connection test on asyncio's loop and on uvloop's (the node's, where installed): a hand-over swaps the
    transport's protocol, which each loop implements on its own."""
    global LOOP
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    LOOP = request.param
    yield
    LOOP = "asyncio"


def serve(scenario: Callable[[int, TinyNode], Awaitable[None]], **config: Any) -> None:
    async def main() -> None:
        node = TinyNode()
        gateway = GatewayConfig(**({"token": "t"} | config))
        server = FastTestServer(make_app(node, gateway), node, gateway)
        await server.start_server()
        try:
            await scenario(server.port, node)
        finally:
            await server.close()

    if LOOP == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def output(node: TinyNode, body: bytes) -> bool:
    got = json.loads(body)["outputs"][0]
    expected = node.linear(torch.tensor(X)).detach()
    assert got["shape"] == [1, 3]
    return torch.equal(torch.tensor(got["data"], dtype=torch.float32).reshape(1, 3), expected)


# -- heads ----------------------------------------------------------------------------------------------------


def test_parse_head_takes_plain_infer_requests() -> None:
    head = parse_head(b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
                      b"Inference-Header-Content-Length: 7\r\nX-Request-ID: abc\r\ncOnNeCtIoN: Keep-Alive")
    assert head is not None
    assert (head.name, head.version, head.length, head.header_length, head.request_id, head.close) == \
        ("linear", None, 12, "7", "abc", False)
    versioned = parse_head(b"POST /v2/models/m-1_a/versions/3/infer HTTP/1.1\r\nContent-Length:0\r\nConnection: close")
    assert versioned is not None and (versioned.name, versioned.version, versioned.close) == ("m-1_a", "3", True)


@pytest.mark.parametrize("head", [
    b"GET /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1",
    b"POST /v2/models/linear/infer HTTP/1.0\r\nContent-Length: 1",
    b"POST /v2/models/linear/ready HTTP/1.1\r\nContent-Length: 1",
    b"POST /v2/models/lin%65ar/infer HTTP/1.1\r\nContent-Length: 1",
    b"POST /v2/models/linear/infer?x=1 HTTP/1.1\r\nContent-Length: 1",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1\r\nConnection: upgrade\r\nUpgrade: h2c",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: +1",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1\r\nX-A: b\r\n continued",
    b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length : 1",
    b"POST  /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 1",
])
def test_parse_head_leaves_the_rest_to_aiohttp(head: bytes) -> None:
    assert parse_head(head) is None


# -- connections ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("loop")
def test_pipelined_requests_are_answered_in_order() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head(extra="X-Request-ID: first\r\n") + infer_head("nope")
                     + infer_head(extra="X-Request-ID: third\r\n"))
        first, missing, third = [await read_response(reader) for _ in range(3)]
        assert first[0] == 200 and first[1]["x-request-id"] == "first" and output(node, first[2])
        assert "server" not in first[1]  # the fast path's
        assert missing[0] == 404 and "nope" in json.loads(missing[2])["error"]
        assert third[0] == 200 and third[1]["x-request-id"] == "third" and output(node, third[2])
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_a_connection_goes_to_aiohttp_at_its_first_other_request() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head())
        status, headers, body = await read_response(reader)
        assert status == 200 and "server" not in headers and output(node, body)
        # The health probe and the infer behind it, in one write: both go to aiohttp, in order.
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n" + infer_head())
        status, headers, body = await read_response(reader)
        assert status == 200 and json.loads(body) == {"live": True} and "aiohttp" in headers["server"]
        status, headers, body = await read_response(reader)
        assert status == 200 and "aiohttp" in headers["server"] and output(node, body)
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_requests_arriving_in_pieces() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        padded = BODY + b" " * (512 << 10)  # JSON allows the whitespace: a large body in many reads
        for request, piece in ((infer_head(), 1), (infer_head(body=padded), 1000)):
            for i in range(0, len(request), piece):
                writer.write(request[i:i + piece])
                await writer.drain()
                await asyncio.sleep(0)
            status, headers, body = await read_response(reader)
            assert status == 200 and "server" not in headers and output(node, body)
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_read_ms_counts_from_a_requests_first_bytes_read() -> None:
    """``read_ms``: from the first bytes of a request read to its handler: a body that comes 0.2 s after its head
    counts that; a request read whole, or pipelined behind another (read with it), hardly anything. The margin
    the node is given counts the reading too: the client's wait began with it."""
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = infer_head()
        writer.write(request[:-len(BODY)])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(request[-len(BODY):])
        slow = json.loads((await read_response(reader))[2])["parameters"]
        writer.write(infer_head() + infer_head())
        whole, behind = [json.loads((await read_response(reader))[2])["parameters"] for _ in range(2)]
        # The 0.2 s sleep may end a little early on the clock the gateway reads (a CI run measured 199.6 ms:
        # uvloop's timers round to milliseconds).
        assert 190 <= slow["read_ms"] < 2000, slow
        assert 0 <= whole["read_ms"] < 100 and 0 <= behind["read_ms"] < 100, (whole, behind)
        assert node.margins[0] >= slow["read_ms"] >= 190 and node.margins[1] < 100, node.margins
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_connection_close_is_honoured() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head(extra="Connection: close\r\n"))
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["connection"] == "close" and output(node, body)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_chunked_bodies_and_long_heads_are_served_by_aiohttp() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        half = len(BODY) // 2
        writer.write(b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:]))
        status, headers, body = await read_response(reader)
        assert status == 200 and "aiohttp" in headers["server"] and output(node, body)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head(extra=f"X-Long: {'a' * (MAX_HEAD + 10)}\r\n"))
        status, headers, _ = await read_response(reader)
        assert status in (400, 431) and "aiohttp" in headers["server"]
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_a_body_over_the_limit_gets_413() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head(body=b" " * 2048))
        status, _, body = await read_response(reader)
        assert status == 413 and "limit" in json.loads(body)["error"]
        writer.close()

    serve(scenario, max_body_bytes=1024)


@pytest.mark.usefixtures("loop")
def test_overload_answers_carry_retry_after() -> None:
    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(infer_head("busy"))
        status, headers, body = await read_response(reader)
        assert status == 429 and headers["retry-after"] == "3" and "server" not in headers
        assert headers["content-type"] == "application/json" and json.loads(body)["error"] == "queue full"
        writer.close()

    serve(scenario)


@pytest.mark.usefixtures("loop")
def test_idle_connections_are_closed_busy_ones_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "KEEPALIVE_S", 0.2)

    async def scenario(port: int, node: TinyNode) -> None:
        silent = await asyncio.open_connection("127.0.0.1", port)
        served = await asyncio.open_connection("127.0.0.1", port)
        busy = await asyncio.open_connection("127.0.0.1", port)
        served[1].write(infer_head())
        status, _, body = await read_response(served[0])
        assert status == 200 and output(node, body)
        busy[1].write(infer_head("hang"))  # answered at the request timeout (1 s), long after 0.2 s of silence
        assert await asyncio.wait_for(silent[0].read(), 5) == b""
        assert await asyncio.wait_for(served[0].read(), 5) == b""
        status, _, body = await read_response(busy[0])
        assert status == 504 and "timed out" in json.loads(body)["error"]
        for _, writer in (silent, served, busy):
            writer.close()

    serve(scenario, request_timeout_s=1.0)


# -- large answers --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("loop")
def test_a_large_answer_is_written_off_the_loop_and_the_connection_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer of at least OFF_LOOP_BYTES (``wide``: 1.5 MiB of fp16 per row) is written by a thread; the
    bytes arrive whole and in order, the loop answers another connection meanwhile, and the next request on the
    same connection is answered after it."""
    from swapserve.gateway import oip

    x = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    enc = oip.encode_infer_request({"x": x}, binary_inputs=True, binary_outputs=True)
    head = (f"POST /v2/models/wide/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(enc.body)}\r\n"
            f"Inference-Header-Content-Length: {enc.header_length}\r\n\r\n").encode()

    threads = []
    send_all = fast.send_all
    monkeypatch.setattr(fast, "send_all", lambda *a: (threads.append(1), send_all(*a))[1])

    async def scenario(port: int, node: TinyNode) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        other_r, other_w = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + enc.body + infer_head())
        other_w.write(infer_head())
        status, headers, body = await read_response(other_r)  # while the large answer waits to be read
        assert status == 200 and output(node, body)
        status, headers, body = await read_response(reader)
        assert status == 200 and len(body) >= fast.OFF_LOOP_BYTES
        _, out = oip.decode_infer_response(body, headers["inference-header-content-length"])
        assert torch.equal(out["big"], torch.arange(786432, dtype=torch.float16).reshape(1, -1) * 2)
        status, _, body = await read_response(reader)
        assert status == 200 and output(node, body)
        for w in (writer, other_w):
            w.close()

    serve(scenario)
    assert threads == [1]  # the large answer only


def test_send_all_writes_everything_in_order_to_a_slow_reader() -> None:
    import os
    import socket
    import threading

    a, b = socket.socketpair()
    a.setblocking(False)
    data = [bytes(range(256)) * 20000, memoryview(bytearray(b"\x07" * 3_000_001)), b"end"]
    got = bytearray()

    def read() -> None:
        while chunk := b.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    fast.send_all(os.dup(a.fileno()), data, 5.0)
    a.close()
    reader.join(10)
    assert bytes(got) == b"".join(bytes(d) for d in data)
    b.close()


def test_send_all_gives_up_on_a_peer_that_stops_reading_or_goes_away() -> None:
    import os
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    with pytest.raises(TimeoutError):
        fast.send_all(os.dup(a.fileno()), [bytes(32 << 20)], 0.2)  # more than the socket buffers hold
    b.close()
    with pytest.raises(OSError):
        fast.send_all(os.dup(a.fileno()), [bytes(32 << 20)], 0.2)
    a.close()
