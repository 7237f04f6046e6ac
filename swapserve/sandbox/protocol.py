"""The wire between a sandbox and its pool: length-prefixed msgpack messages over a socket, and tensors in
a shared-memory arena.

Tenant code controls the sandbox, so everything the sandbox sends is untrusted: the parent decodes it with
msgpack (plain data only, no extension types, no pickling), checks each message against its schema, and
checks every tensor reference against the arena's bounds before touching a byte. A message that fails a
check is a protocol violation: the sandbox is killed.

The arena is a sealed memfd: the sandbox can neither shrink it (which would fault the parent's reads) nor
grow it, and it has no path anyone else could open. The parent writes in the first half (request inputs,
model outputs), the sandbox in the second (model inputs, responses); each side bump-allocates its half
and starts over at each request, since one sandbox serves one request at a time. The handler sees what the
parent wrote as views, valid until the request ends, and names such a view where it lies when it passes it
on (a request input to a model, a model's output in its response) rather than copying it; the parent copies
out what it receives before the next request starts. A reference may point anywhere in the arena: it holds
only this sandbox's own tensors, and the sandbox could write any of it anyway.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from swapserve.artifact.manifest import dtype_from_name, dtype_name, itemsize
from swapserve.errors import ArtifactError, PayloadTooLargeError

ALIGN = 64
"""Offsets of tensors in the arena (any dtype's alignment, a cache line)."""
MAX_TENSORS = 256
MAX_RANK = 16
MAX_TEXT = 64 * 1024
"""Error messages and tracebacks from a sandbox are cut to this many characters."""
MAX_JSON_DEPTH = 128
HEADER = struct.Struct(">I")

WireTensor = tuple[str, str, tuple[int, ...], int]
"""(name, dtype name as in manifests, shape, arena offset)."""


class ProtocolViolation(Exception):
    """A sandbox message that is not what the protocol allows."""


# --- framing ------------------------------------------------------------------------------------


def pack(message: Mapping[str, Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> Any:
    """Plain data only: str/bytes/int/float/bool/None/list/dict; extension types are refused."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_ext)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolViolation(f"msgpack extension type {code} is not allowed")


def send_blocking(sock: Any, message: Mapping[str, Any]) -> None:
    sock.sendall(pack(message))


def recv_blocking(sock: Any, max_bytes: int) -> Any | None:
    """One message, or None at end of stream."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    if n > max_bytes:
        raise ProtocolViolation(f"a message of {n} bytes exceeds the limit of {max_bytes}")
    body = _recv_exact(sock, n)
    if body is None:
        return None
    return unpack(body)


def _recv_exact(sock: Any, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# --- the arena ----------------------------------------------------------------------------------


class Arena:
    """A sandbox's shared memory. ``Arena.create`` in the parent; ``Arena(fd, nbytes)`` in the sandbox."""

    def __init__(self, fd: int, nbytes: int):
        if nbytes % (2 * ALIGN):
            raise ValueError(f"arena size must be a multiple of {2 * ALIGN}")
        if os.fstat(fd).st_size != nbytes:
            raise ValueError(f"arena fd has {os.fstat(fd).st_size} bytes, expected {nbytes}")
        self.fd = fd
        self.nbytes = nbytes
        self.half = nbytes // 2
        self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self._typed: dict[str, torch.Tensor] = {}
        """The whole arena viewed as each dtype (a view per tensor is then one as_strided)."""

    @classmethod
    def create(cls, nbytes: int) -> Arena:
        nbytes = -(-nbytes // (2 * ALIGN)) * (2 * ALIGN)
        fd = os.memfd_create("swapserve-sandbox-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise

    def parent_side(self) -> Bump:
        return Bump(self, 0, self.half)

    def child_side(self) -> Bump:
        return Bump(self, self.half, self.nbytes)

    def view(self, dtype: str, shape: Sequence[int], offset: int) -> torch.Tensor:
        """``offset`` must be a multiple of ALIGN (checked for what a sandbox sends)."""
        base = self._typed.get(dtype)
        if base is None:
            base = self._typed[dtype] = self.buffer.view(dtype_from_name(dtype))
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        return base.as_strided(tuple(shape), tuple(reversed(strides)), offset // base.element_size())

    def read(self, refs: Sequence[WireTensor], copy: bool = True) -> dict[str, torch.Tensor]:
        """Tensors by name: private copies, or (``copy=False``) views valid until the side that wrote them
        starts its next request."""
        out = {}
        for name, dtype, shape, offset in refs:
            t = self.view(dtype, shape, offset)
            out[name] = t.clone() if copy else t
        return out

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where ``t`` lies in the arena if it is a whole contiguous run of its bytes at an aligned offset (a view
        of what either side wrote), else None."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        off = t.data_ptr() - self.buffer.data_ptr()
        if off < 0 or off % ALIGN or off + t.numel() * t.element_size() > self.nbytes:
            return None
        return off

    def close(self) -> None:
        """Idempotent (the descriptor is closed once: a second close could hit a reused number)."""
        if self.fd < 0:
            return
        self.buffer = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # views still alive somewhere: the mapping goes with the last of them
            pass
        self._typed.clear()
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError:
            pass


class Bump:
    """One side's half of the arena: allocation from the start, reset at each request."""

    def __init__(self, arena: Arena, lo: int, hi: int):
        self.arena, self.lo, self.hi, self.top = arena, lo, hi, lo

    def reset(self) -> None:
        self.top = self.lo

    def _take(self, nbytes: int) -> int | None:
        """The offset of ``nbytes`` more of this half (the top moves past them, aligned), or None if full."""
        start, end = self.top, self.top + nbytes
        if end > self.hi:
            return None
        self.top = -(-end // ALIGN) * ALIGN
        return start

    def alloc(self, like: torch.Tensor) -> torch.Tensor | None:
        """Room for a tensor shaped and typed as ``like`` (a model call's output, which the controller's
        dispatcher writes there straight from the worker's slab), or None if this half is full."""
        dtype = dtype_name(like.dtype)
        shape = tuple(int(d) for d in like.shape)
        start = self._take(_nbytes(dtype, shape))
        return None if start is None else self.arena.view(dtype, shape, start)

    def write(self, tensors: Mapping[str, torch.Tensor], what: str) -> list[WireTensor]:
        refs = []
        for name, t in tensors.items():
            dtype = dtype_name(t.dtype)
            shape = tuple(int(d) for d in t.shape)
            if (start := self._take(_nbytes(dtype, shape))) is None:
                raise PayloadTooLargeError(f"{what} need more than the sandbox's {self.hi - self.lo} bytes of "
                                           f"shared memory this way; raise slab_bytes")
            self.arena.view(dtype, shape, start).copy_(t)
            refs.append((name, dtype, shape, start))
        return refs

    def place(self, tensors: Mapping[str, torch.Tensor], what: str) -> list[WireTensor]:
        """As :meth:`write`, but a tensor already in the arena (a request input, a model call's output, as the
        handler got them) is named where it lies instead of copied."""
        refs = []
        for name, t in tensors.items():
            off = self.arena.offset_of(t)
            if off is None:
                refs += self.write({name: t}, what)
            else:
                refs.append((name, dtype_name(t.dtype), tuple(int(d) for d in t.shape), off))
        return refs


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return itemsize(dtype) * math.prod(shape)


def encode_tensors(refs: Sequence[WireTensor]) -> list[list[Any]]:
    return [[name, dtype, list(shape), offset] for name, dtype, shape, offset in refs]


def decode_tensors(raw: Any, lo: int, hi: int) -> list[WireTensor]:
    """Check tensor references from the other side: names unique, dtype known, shape sane, bytes within
    ``[lo, hi)``, offset aligned."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ProtocolViolation(f"tensors must be a list of at most {MAX_TENSORS}")
    out: list[WireTensor] = []
    seen: set[str] = set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 4):
            raise ProtocolViolation("a tensor reference must be [name, dtype, shape, offset]")
        name, dtype, shape, offset = item
        if not isinstance(name, str) or not 0 < len(name) <= 256 or name in seen:
            raise ProtocolViolation(f"bad or repeated tensor name {name!r:.80}")
        seen.add(name)
        if not isinstance(dtype, str):
            raise ProtocolViolation("a tensor dtype must be a string")
        try:
            itemsize(dtype)
        except ArtifactError as e:
            raise ProtocolViolation(str(e)) from None
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise ProtocolViolation(f"bad shape for tensor {name!r}")
        if type(offset) is not int or offset % ALIGN:
            raise ProtocolViolation(f"bad offset for tensor {name!r}")
        n = _nbytes(dtype, shape)
        if not lo <= offset or offset + n > hi:
            raise ProtocolViolation(f"tensor {name!r} ({n} bytes at {offset}) lies outside the sandbox's "
                                    f"arena half [{lo}, {hi})")
        out.append((name, dtype, tuple(shape), offset))
    return out


# --- sandbox → parent messages, parsed and checked ---------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The sandbox is isolated, ``handler.py`` imported and ``setup()`` done."""

    pid: int
    isolation: dict[str, Any]
    """What the sandbox applied (see :func:`swapserve.sandbox.isolation.describe`)."""
    timings: dict[str, float]
    """Milliseconds in the sandbox: ``isolate``, ``import``, ``setup``."""
    has_setup: bool
    is_async: bool


@dataclass(frozen=True)
class LoadFailed:
    stage: str
    """``isolation``, ``import``, ``handle`` or ``setup``."""
    message: str
    detail: str


@dataclass(frozen=True)
class Call:
    """A model call from the handler of request ``request``."""

    request: int
    id: int
    model: str
    inputs: list[WireTensor]


@dataclass(frozen=True)
class Response:
    request: int
    tensors: list[WireTensor]
    parameters: dict[str, Any]
    json: Any
    is_json: bool


@dataclass(frozen=True)
class Failure:
    request: int
    kind: str
    """``handler`` (it raised), ``output`` (wrong return value), ``memory`` (out of its limit)."""
    message: str
    detail: str
    call: int | None
    """The model call whose error the handler let through, if that is why it failed."""


ChildMessage = Hello | LoadFailed | Call | Response | Failure

_KINDS = ("handler", "output", "memory")
_STAGES = ("isolation", "import", "handle", "setup")


def parse_child_message(msg: Any, lo: int, hi: int) -> ChildMessage:
    """Check one decoded message from a sandbox; tensors must lie in ``[lo, hi)`` of its arena."""
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolViolation("a message must be a map with a type 't'")
    t = msg["t"]
    if t == "call":
        return Call(_int(msg, "req"), _int(msg, "id"), _str(msg, "model", 256), decode_tensors(msg.get("inputs"), lo, hi))
    if t == "resp":
        is_json = msg.get("is_json")
        if not isinstance(is_json, bool):
            raise ProtocolViolation("resp.is_json must be a boolean")
        params = msg.get("params", {})
        if not isinstance(params, dict):
            raise ProtocolViolation("resp.params must be a map")
        check_json(params)
        value = msg.get("json")
        check_json(value)
        tensors = [] if is_json else decode_tensors(msg.get("tensors"), lo, hi)
        return Response(_int(msg, "req"), tensors, params, value, is_json)
    if t == "fail":
        kind = msg.get("kind")
        if kind not in _KINDS:
            raise ProtocolViolation(f"fail.kind must be one of {_KINDS}")
        call = msg.get("call")
        if call is not None and type(call) is not int:
            raise ProtocolViolation("fail.call must be an integer or nil")
        return Failure(_int(msg, "req"), kind, _text(msg, "message"), _text(msg, "detail"), call)
    if t == "hello":
        iso, timings = msg.get("isolation"), msg.get("timings")
        if not isinstance(iso, dict) or not isinstance(timings, dict):
            raise ProtocolViolation("hello needs isolation and timings maps")
        check_json(iso)
        clean_timings = {}
        for k, v in timings.items():
            if not isinstance(k, str) or type(v) not in (int, float):
                raise ProtocolViolation("hello.timings must map names to numbers")
            clean_timings[k] = float(v)
        return Hello(_int(msg, "pid"), iso, clean_timings, bool(msg.get("has_setup")), bool(msg.get("is_async")))
    if t == "loadfail":
        stage = msg.get("stage")
        if stage not in _STAGES:
            raise ProtocolViolation(f"loadfail.stage must be one of {_STAGES}")
        return LoadFailed(stage, _text(msg, "message"), _text(msg, "detail"))
    raise ProtocolViolation(f"unknown message type {t!r:.40}")


def _int(msg: dict[str, Any], key: str) -> int:
    v = msg.get(key)
    if type(v) is not int or not 0 <= v < 1 << 62:
        raise ProtocolViolation(f"{msg.get('t')}.{key} must be a non-negative integer")
    return v


def _str(msg: dict[str, Any], key: str, limit: int) -> str:
    v = msg.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise ProtocolViolation(f"{msg.get('t')}.{key} must be a string of at most {limit} characters")
    return v


def _text(msg: dict[str, Any], key: str) -> str:
    v = msg.get(key, "")
    if not isinstance(v, str):
        raise ProtocolViolation(f"{msg.get('t')}.{key} must be a string")
    return v if len(v) <= MAX_TEXT else v[:MAX_TEXT] + " [...]"


def check_json(value: Any) -> None:
    """A JSON value: maps with string keys, lists, strings, finite numbers, booleans, null; bounded depth.
    Iterative, so no input can exhaust the parent's stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, (bool, int, str)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ProtocolViolation("JSON numbers must be finite")
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ProtocolViolation(f"JSON nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ProtocolViolation("JSON object keys must be strings")
                stack.append((x, depth + 1))
        else:
            raise ProtocolViolation(f"{type(v).__name__} is not a JSON value")
