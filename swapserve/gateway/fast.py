"""The OIP infer route without aiohttp's per-request machinery: a plain protocol in front of the aiohttp app.

Every connection starts here. A request that is a plain ``POST /v2/models/{name}[/versions/{v}]/infer`` over
HTTP/1.1 with a ``Content-Length`` body — what OIP clients send — is answered here: parsed, run and written with
the app's own code (:func:`swapserve.gateway.app.answer_infer`) and with the same answers, errors, headers,
time limit and metrics as the app's route, without aiohttp's request and response objects, middleware and router
(~0.2 ms of the ~1.3 ms a request spent outside its model on an H200 node). Anything else — another route,
another method or version, ``Transfer-Encoding``, ``Expect``, ``Upgrade``, percent-encoded paths, a head over
:data:`MAX_HEAD` bytes, a body over the limit — hands the connection, with every byte read so far, to aiohttp's own
handler, which serves it from then on (and answers what is wrong with it as it always did).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web

from swapserve.errors import SwapserveError
from swapserve.gateway import oip
from swapserve.gateway.app import (InferCall, answer_infer, error_answer, function_at, internal_error_message,
                                   timed_out_message)
from swapserve.gateway.common import MARGINS, REQUEST_ID_HEADER, GatewayMetrics, error_body, safe_request_id
from swapserve.gateway.config import GatewayConfig
from swapserve.gateway.margin import Margins
from swapserve.node.api import NodeAPI

log = logging.getLogger(__name__)

MAX_HEAD = 8190
"""The longest request head answered here (aiohttp's limit of one line; infer heads are a few hundred bytes)."""

_TARGET = re.compile(rb"/v2/models/([A-Za-z0-9_.-]+)(?:/versions/([A-Za-z0-9_.-]+))?/infer")
ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
"""The metrics' route labels, as the app's router names the two infer routes."""

KEEPALIVE_S = 75.0
"""A connection that says nothing for this long while no request of it is being answered is closed (aiohttp's
keep-alive timeout for the connections it serves)."""

OFF_LOOP_BYTES = 1 << 20
"""An answer at least this large is written to its socket by a thread, not by the event loop that every request
shares: the kernel's copy of GPT-2's 12.9 MB of logits into the socket held the loop for milliseconds an answer
(the socket writes were the largest part of the loop's work for it, py-spy on the CI box), and on an H200 node
88–100 % of the worker replies the loop took up more than 2.5 ms late came within 10 ms of such an answer
(``bench/late_replies.py``, 2026-11-29)."""

SEND_STALL_S = 10.0
"""A client that reads nothing of such an answer for this long loses its connection (the thread writing it is
not held longer, so a stop never waits more for it)."""

_HANDED_OVER = (b"transfer-encoding", b"expect", b"upgrade")
"""Headers whose request aiohttp serves (chunked bodies, 100-continue, protocol switches)."""


@dataclass(frozen=True)
class _Head:
    name: str
    version: str | None
    length: int
    header_length: str | None
    request_id: str | None
    close: bool
    """``Connection: close``: close once answered."""


def parse_head(head: bytes) -> _Head | None:
    """The infer request a head (up to, not including, its blank line) asks for, or None when it is anything
    this path leaves to aiohttp."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    m = _TARGET.fullmatch(parts[1])
    if m is None:
        return None
    length: int | None = None
    header_length = request_id = None
    close = False
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if not sep or not key or line[:1] in b" \t" or key[-1:] in b" \t":  # folded or malformed: aiohttp's 400
            return None
        key, value = key.lower(), value.strip(b" \t")
        if key == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif key == b"connection":
            token = value.lower()
            if token == b"close":
                close = True
            elif token != b"keep-alive":
                return None
        elif key == b"inference-header-content-length":
            if header_length is not None:
                return None
            header_length = value.decode("latin-1")
        elif key == b"x-request-id":
            request_id = value.decode("latin-1")
        elif key in _HANDED_OVER:
            return None
    if length is None:
        return None
    version = m.group(2)
    return _Head(m.group(1).decode(), version.decode() if version is not None else None, length, header_length,
                 request_id, close)


class FastGateway:
    """What the connections share: the node, the limits, the metrics, the margins (the app's), aiohttp's handler
    factory for what they hand over, and the connections themselves (for a clean stop)."""

    def __init__(self, node: NodeAPI, config: GatewayConfig, metrics: GatewayMetrics, margins: Margins,
                 server: web.Server):
        self.node = node
        self.config = config
        self.metrics = metrics
        self.margins = margins
        self.server = server
        self.connections: set[FastHTTP] = set()
        self._date = (0, "")

    def protocol(self) -> FastHTTP:
        return FastHTTP(self)

    def date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    async def close(self, timeout: float) -> None:
        """Close idle connections now and busy ones once answered (within ``timeout`` seconds)."""
        busy = []
        for c in list(self.connections):
            if c.task is None:
                c.close()
            else:
                c.closing = True
                busy.append(c.task)
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for c in list(self.connections):
            c.close()


class Listener:
    """A listening fast path in front of an aiohttp app (:func:`listen`)."""

    def __init__(self, gateway: FastGateway, server: asyncio.base_events.Server):
        self.gateway = gateway
        self.server = server

    async def close(self, timeout: float) -> None:
        """Stop listening; close idle connections now, busy ones once answered (within ``timeout`` s). The app's
        runner closes the connections handed to it (``runner.cleanup()``, after this)."""
        self.server.close()
        await self.gateway.close(timeout)


async def listen(runner: web.AppRunner, node: NodeAPI, config: GatewayConfig, metrics: GatewayMetrics, *,
                 host: str | None = None, port: int | None = None, sock: Any = None) -> Listener:
    """Serve ``runner``'s app (set up already) behind the fast path, on ``host``:``port`` or on the listening
    socket ``sock``. Raises OSError if it cannot listen."""
    assert runner.server is not None, "set the runner up first"
    gateway = FastGateway(node, config, metrics, runner.app[MARGINS], runner.server)
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(gateway.protocol, sock=sock)
    else:
        server = await loop.create_server(gateway.protocol, host, port, backlog=128)
    return Listener(gateway, server)


class FastHTTP(asyncio.Protocol):
    """One connection, until it is handed to aiohttp."""

    def __init__(self, gateway: FastGateway):
        self.g = gateway
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        """What was read and not yet taken up (joined only when needed: a large body arrives in many chunks)."""
        self.size = 0
        self.arrived = 0.0
        """``time.perf_counter()`` when the first bytes of the request now buffered were read (its ``read_ms``)."""
        self.last_read = 0.0
        """When the latest bytes were read."""
        self.head: _Head | None = None
        """The head of the request whose body is arriving, once parsed."""
        self.body_at = 0
        """Where that body starts in the chunks joined."""
        self.task: asyncio.Task[None] | None = None
        """The request being answered (requests of a connection are answered one at a time, in order)."""
        self.closing = False
        self._drained: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.g.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        # A request in flight goes on (as aiohttp's handlers do); its answer has nowhere to go.
        self.g.connections.discard(self)
        self.transport = None
        self.chunks, self.size = [], 0
        self._disarm_idle()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def data_received(self, data: bytes) -> None:
        self.last_read = time.perf_counter()
        if not self.size:
            self.arrived = self.last_read
        self.chunks.append(data)
        self.size += len(data)
        if self.task is None:
            self._next()
            self._idle_unless_busy()

    def _idle_unless_busy(self) -> None:
        """The keep-alive clock restarts unless a request is being answered (or aiohttp serves the connection)."""
        if self.task is None and self.transport is not None:
            self._arm_idle()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._idle_out)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_out(self) -> None:
        self._idle = None
        if self.task is None:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _next(self) -> None:
        """Take up the next whole request read, if any (or hand the connection over)."""
        if not self.size or self.transport is None:
            return
        if self.head is None:
            buf = self._joined()
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_over()
                return
            head = parse_head(bytes(buf[:end]))
            if head is None or head.length > self.g.config.max_body_bytes:
                self._hand_over()
                return
            self.head, self.body_at = head, end + 4
        end = self.body_at + self.head.length
        if self.size < end:
            return  # the body is on its way
        buf = self._joined()
        head, body, rest = self.head, memoryview(buf)[self.body_at:end], buf[end:]
        self.head, self.chunks, self.size = None, [rest] if rest else [], len(rest)
        arrived, self.arrived = self.arrived, self.last_read  # the next request's first bytes came with the last read
        self._disarm_idle()
        self.task = asyncio.get_running_loop().create_task(self._serve(head, body, arrived))

    def _joined(self) -> bytes | bytearray:
        """What was read, as one buffer: joined into a bytearray when it came in several reads, whose binary
        tensors the request then decodes in place (writable: no copy of their bytes, see ``oip._from_bytes``)."""
        if len(self.chunks) > 1:
            self.chunks = [bytearray().join(self.chunks)]
        return self.chunks[0]

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with what was read of it."""
        transport, chunks = self.transport, self.chunks
        assert transport is not None
        self.g.connections.discard(self)
        self.transport, self.chunks, self.size = None, [], 0
        self._disarm_idle()  # aiohttp keeps its own
        handler = self.g.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        for chunk in chunks:
            handler.data_received(bytes(chunk))  # as a transport gives them (a joined read is a bytearray here)

    async def _serve(self, head: _Head, body: memoryview, arrived: float) -> None:
        try:
            await self._respond(head, body, arrived)
        except BaseException:  # a bug past _answer's handlers, or cancelled at exit: end the connection, not hang it
            self.close()
            raise
        self.task = None
        if head.close or self.closing:
            self.close()
        else:
            self._next()
            self._idle_unless_busy()

    async def _respond(self, head: _Head, body: memoryview, arrived: float) -> None:
        entered = time.perf_counter()
        call = InferCall()
        status, parts, headers, function = await self._answer(head, body, arrived, entered, call)
        elapsed = time.perf_counter() - entered
        route = ROUTES[head.version is not None]
        self.g.metrics.observe_http(route, "POST", status, elapsed)
        if function is not None:
            self.g.metrics.observe_request(function, status, elapsed)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
            lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Length: {size}",
                     f"Date: {self.g.date()}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            if head.close or self.closing:
                lines.append("Connection: close")
            message = [("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), *parts]
            fd = _own_fd(transport) if size >= OFF_LOOP_BYTES and not transport.get_write_buffer_size() else None
            if fd is not None:  # nothing else writes to this connection meanwhile: its next request waits
                try:
                    await asyncio.to_thread(send_all, fd, message, SEND_STALL_S)
                except OSError:  # the client went away or stopped reading: the connection ends
                    self.close()
                    return
            else:
                transport.writelines(message)
                if self._drained is not None:
                    await self._drained
            call.learn(self.g.margins)

    async def _answer(self, head: _Head, body: memoryview, arrived: float, entered: float, call: InferCall,
                      ) -> tuple[int, tuple[bytes | memoryview, ...], dict[str, str], str | None]:
        """(status, body parts, headers, the function if it exists) — as the app's middleware and route answer."""
        limit = self.g.config.request_timeout_s
        function = None
        headers: dict[str, str] = {}
        timeout = asyncio.timeout(limit)
        try:
            async with timeout:
                info = function_at(self.g.node, head.name, head.version)
                function = info.spec.name
                encoded = await answer_infer(self.g.node, info, body, head.header_length, head.request_id, entered,
                                             call, self.g.margins, arrived)
            status, parts = 200, encoded.parts
            headers["Content-Type"] = encoded.content_type
            if encoded.header_length is not None:
                headers[oip.HEADER_LENGTH] = str(encoded.header_length)
        except TimeoutError:
            message = (timed_out_message(limit) if timeout.expired() else
                       internal_error_message("POST", _path(head)))  # raised by the node, not our deadline: a bug
            status, parts = (504 if timeout.expired() else 500), (error_body(message),)
        except SwapserveError as e:
            status, message, headers = error_answer(e)
            parts = (error_body(message),)
        except Exception:
            status, parts = 500, (error_body(internal_error_message("POST", _path(head))),)
        if status != 200:
            headers["Content-Type"] = oip.JSON_CONTENT_TYPE
        if (rid := call.request_id or safe_request_id(head.request_id)) is not None:
            headers[REQUEST_ID_HEADER] = rid
        return status, parts, headers, function


def _own_fd(transport: asyncio.Transport) -> int | None:
    """A duplicate of the connection's socket descriptor, for a thread to write to (None where there is none,
    or no descriptor is left: the loop writes then)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return os.dup(sock.fileno())
    except OSError:
        return None


def send_all(fd: int, parts: list[bytes | memoryview], timeout_s: float) -> None:
    """Write ``parts`` to the (non-blocking) socket ``fd``, waiting while it is full, then close ``fd`` (a
    duplicate: the connection's transport keeps its own). Raises TimeoutError (an OSError) if the peer reads
    nothing for ``timeout_s``, or the OSError of a broken connection."""
    try:
        views = [memoryview(p).cast("B") for p in parts]
        writable = select.poll()
        writable.register(fd, select.POLLOUT)
        while views:
            try:
                sent = os.writev(fd, views)
            except BlockingIOError:
                if not writable.poll(timeout_s * 1000):
                    raise TimeoutError(f"the client read nothing for {timeout_s:.0f} s") from None
                continue
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if views:
                views[0] = views[0][sent:]
    finally:
        os.close(fd)


def _path(head: _Head) -> str:
    """The request's path, for the log of a failure."""
    version = f"/versions/{head.version}" if head.version is not None else ""
    return f"/v2/models/{head.name}{version}/infer"


__all__ = ["FastGateway", "FastHTTP", "KEEPALIVE_S", "Listener", "MAX_HEAD", "ROUTES", "listen", "parse_head"]
