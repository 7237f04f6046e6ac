"""A lean HTTP/1.1 client for the benchmarks' load generators: keep-alive connections, one request at a time on
each, responses received straight into a reusable buffer — on asyncio (:class:`Client`), or on one blocking
socket (:class:`BlockingConnection`) for a sequential client that measures a server's per-request overhead.

It exists so that the client does not weigh on what a benchmark measures. aiohttp's client, on the 2-core CI
box, took 13–17 ms to receive GPT-2's 12.9 MB answer from a local aiohttp server, where a plain socket took
3–6 ms from the same server; in the trace a client process receiving one such answer delays every other
answer it is waiting for by as long. Here a response's bytes land in one buffer through
``asyncio.BufferedProtocol`` (no bytes object per read, no per-chunk stream machinery), and only the part a
caller keeps (``keep``) is copied out. Like perf_analyzer for Triton: the load generator is not the system.

Supports what the benchmarks need: any method, a bytes body, ``Content-Length`` or chunked responses.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse
from dataclasses import dataclass

READ_BYTES = 4 << 20
"""How much one receive may take from the socket."""
MAX_HEAD = 64 << 10


class HTTPError(Exception):
    """A malformed response or a connection lost mid-response."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    """The body, or only its first bytes when the request said how many to keep."""
    head_at: float
    """``time.perf_counter()`` when the response's head had arrived."""
    body_bytes: int


class _Parser:
    """One response at a time, fed as its bytes arrive (from a protocol or a blocking socket)."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, keep_header: str | None, keep_more: int = 0) -> None:
        self.keep_header, self.keep_more, self.keep = keep_header, keep_more, None
        self.head = bytearray()
        self.status, self.headers, self.head_at = 0, {}, 0.0
        self.in_head = True
        self.remaining = 0  # body bytes still to come (chunked: of the current chunk; -1: its CRLF next)
        self.chunked = False
        self.chunk_tail = bytearray()  # chunked: undecoded framing carried between reads
        self.body = bytearray()
        self.body_bytes = 0
        self.response: Response | None = None

    def feed(self, data: memoryview) -> Response | None:
        """Take the next bytes; the response once it is whole (bytes past its end are not expected: one request
        at a time on a connection)."""
        if self.in_head:
            seen = len(self.head)
            self.head += data[:MAX_HEAD]  # never the body: a first read may bring megabytes of it
            end = self.head.find(b"\r\n\r\n", max(0, seen - 3))
            if end < 0:
                if len(self.head) >= MAX_HEAD:
                    raise HTTPError("response head too large")
                return None
            self._parse_head(bytes(self.head[:end]))
            self.in_head, self.head_at = False, time.perf_counter()
            data = data[end + 4 - seen:]
        if self.chunked:
            self._feed_chunked(data)
        else:
            self._take(data[:self.remaining])
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._done()
        return self.response

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPError(f"bad status line {lines[0]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPError(f"bad header line {line!r}")
            self.headers[name.strip().lower()] = value.strip()
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            self.chunked = True
        elif "content-length" in self.headers:
            self.remaining = int(self.headers["content-length"])
        else:
            raise HTTPError("response with neither Content-Length nor chunked encoding")
        if self.keep_header and (n := self.headers.get(self.keep_header)) is not None:
            self.keep = int(n) + self.keep_more

    def _feed_chunked(self, data: memoryview) -> None:
        # Sizes and framing are parsed from a small carried tail; chunk data passes through ``_take``.
        while True:
            if self.remaining > 0:
                n = min(self.remaining, len(data))
                self._take(data[:n])
                self.remaining -= n
                data = data[n:]
                if self.remaining > 0:
                    return
                self.remaining = -1  # the CRLF after a chunk
            self.chunk_tail += data
            data = memoryview(b"")
            if self.remaining == -1:
                if len(self.chunk_tail) < 2:
                    return
                del self.chunk_tail[:2]
                self.remaining = 0
            end = self.chunk_tail.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(self.chunk_tail[:end]).split(b";")[0], 16)
            if size == 0:  # trailers are not used by the servers we measure
                self._done()
                return
            data = memoryview(bytes(self.chunk_tail[end + 2:]))
            self.chunk_tail.clear()
            self.remaining = size

    def _take(self, data: memoryview) -> None:
        self.body_bytes += len(data)
        if self.keep is None:
            self.body += data
        elif len(self.body) < self.keep:
            self.body += data[:self.keep - len(self.body)]

    def _done(self) -> None:
        self.response = Response(self.status, self.headers, bytes(self.body), self.head_at, self.body_bytes)


def _request_head(method: str, path: str, host: str, port: int, body: bytes, headers: dict[str, str] | None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def _keeps_alive(response: Response) -> bool:
    return response.headers.get("connection", "").lower() != "close"


class _Conn(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(READ_BYTES)
        self.view = memoryview(self.buf)
        self.lost: Exception | None = None
        self.parser = _Parser()
        self.waiter: asyncio.Future | None = None

    # -- asyncio.BufferedProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.waiter is None or self.waiter.done():
            self.lost = HTTPError("data outside a response")
            self.transport.close()
            return
        try:
            response = self.parser.feed(self.view[:nbytes])
        except HTTPError as e:
            self.waiter.set_exception(e)
            self.transport.close()
            return
        if response is not None:
            waiter, self.waiter = self.waiter, None
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = HTTPError(f"connection lost: {exc}" if exc else "connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)


class Client:
    """Keep-alive connections to one ``host:port``; each request takes an idle connection or opens one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_Conn] = []

    @classmethod
    def of(cls, url: str) -> Client:
        """A client of ``http://host:port`` (the path, if any, is the caller's)."""
        where = urllib.parse.urlsplit(url)
        return cls(where.hostname or "127.0.0.1", where.port or 80)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      keep_header: str | None = None, keep_more: int = 0) -> Response:
        """Send one request and receive its whole response. With ``keep_header`` (lower case), a response that
        carries that header keeps only as many bytes of its body as it says (OIP's
        ``Inference-Header-Content-Length``: the JSON head), and ``keep_more`` bytes after them (the first of the
        binary data); the rest is received and counted, not stored."""
        conn = self._idle.pop() if self._idle else await self._open()
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.parser.reset(keep_header, keep_more)
        conn.transport.writelines([_request_head(method, path, self.host, self.port, body, headers), body])
        try:
            response = await conn.waiter
        except BaseException:
            conn.transport.close()
            raise
        if conn.lost is None and _keeps_alive(response):
            self._idle.append(conn)
        else:
            conn.transport.close()
        return response

    async def _open(self) -> _Conn:
        _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
        return conn

    def close(self) -> None:
        for conn in self._idle:
            conn.transport.close()
        self._idle.clear()


class BlockingConnection:
    """One keep-alive connection on a blocking socket: for a sequential client whose own cost per request
    should be as small as it can be (no event loop between the socket and the response), as a C client's
    would. Reopens the connection when the server closed it."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.buf = bytearray(READ_BYTES)
        self.view = memoryview(self.buf)
        self.parser = _Parser()
        self.sock: socket.socket | None = None

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                keep_header: str | None = None) -> Response:
        """As :meth:`Client.request`, blocking."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser.reset(keep_header)
        try:
            self.sock.sendall(_request_head(method, path, self.host, self.port, body, headers) + body)
            while True:
                n = self.sock.recv_into(self.view)
                if not n:
                    raise HTTPError("connection closed")
                if (response := self.parser.feed(self.view[:n])) is not None:
                    break
        except BaseException:
            self.close()
            raise
        if not _keeps_alive(response):
            self.close()
        return response

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
