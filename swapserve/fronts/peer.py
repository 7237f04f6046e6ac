"""Framed, symmetric calls between the controller and its HTTP fronts over a Unix stream socket.

Either side calls the other (``await peer.call(op, args, tensors)``) or sends a notice (no answer). A frame is
an 8-byte prefix (the head's and the body's lengths, little-endian u32), a msgpack head, then (if there are
tensors) zeros up to a 64-byte boundary and the body: the raw bytes of the frame's tensors, each at a 64-byte
aligned offset in it. Heads:

- a call: ``{"c": id, "op": name, "a": args, "t": metas}`` (id 0: a notice, never answered);
- its answer: ``{"r": id, "v": value, "t": metas}``, or ``{"r": id, "e": [message, status, retry_after]}``;
- a caller that gave up (its request timed out): ``{"x": id}``: the callee's task is cancelled.

A tensor meta is ``[name, dtype, shape, offset, nbytes]`` (dtypes named as in manifests), or with a sixth
element ``1`` for a tensor the sender ``Placed`` in its shared memory, which the receiver mapped
(:mod:`swapserve.fronts.arena`), at that offset instead of the body: the receiver sends a ``free`` notice once
its view of it is no longer referenced. Received tensors are views of the frame's own buffer, which a large
frame is read into directly: one kernel copy per side, nothing pickled. Both processes are ours, so frames are
trusted (the sandboxes' wire, which is not, checks every field).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import struct
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import torch

from swapserve.artifact.manifest import DTYPE_NAMES, dtype_from_name, dtype_name, itemsize
from swapserve.errors import OverloadedError, SwapserveError, UnavailableError, retry_after_s

log = logging.getLogger(__name__)

PREFIX = struct.Struct("<II")
ALIGN = 64
SCRATCH_BYTES = 1 << 18
"""Frames up to this size are read through one reused buffer (many per read); larger ones straight into their
own buffer."""
_PAD = bytes(ALIGN)

Tensors = dict[str, torch.Tensor]
Answer = tuple[Any, Mapping[str, "torch.Tensor | Placed"]]


@dataclass(frozen=True)
class Placed:
    """A tensor already written at ``offset`` of the sender's arena, which the receiver mapped (sent by
    reference)."""

    tensor: torch.Tensor
    offset: int


class RemoteError(SwapserveError):
    """An error raised on the other side, with the HTTP status it carried there."""

    def __init__(self, message: str, http_status: int = 500):
        super().__init__(message)
        self.http_status = http_status


class Handler(Protocol):
    async def call(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> Answer:
        """Answer a call: a msgpack-able value and tensors. Raise SwapserveError to answer with an error."""
        ...

    def notice(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> None: ...

    def lost(self, peer: Peer) -> None:
        """The connection closed (or broke): every call in flight has failed."""
        ...


def _numpy_types() -> dict[str, tuple[np.dtype, torch.dtype | None]]:
    """Per dtype name: the numpy dtype its bytes are read as, and the torch dtype to view them as after (numpy
    has no bfloat16). numpy's frombuffer and from_numpy cost a third of torch.frombuffer's per tensor."""
    out: dict[str, tuple[np.dtype, torch.dtype | None]] = {}
    for name in DTYPE_NAMES:
        dt = dtype_from_name(name)
        if dt == torch.bfloat16:
            out[name] = np.dtype(np.int16), dt
        else:
            out[name] = torch.empty(0, dtype=dt).numpy().dtype, None
    return out


_NUMPY = _numpy_types()


def pack_tensors(tensors: Mapping[str, torch.Tensor | Placed]) -> tuple[list[list[Any]], list[bytes | memoryview]]:
    metas: list[list[Any]] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for name, t in tensors.items():
        if isinstance(t, Placed):
            p = t.tensor
            metas.append([name, dtype_name(p.dtype), list(p.shape), t.offset, p.numel() * p.element_size(), 1])
            continue
        if t.requires_grad:
            t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        blob = memoryview((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1)).cast("B")
        if pad := -offset % ALIGN:
            parts.append(_PAD[:pad])
            offset += pad
        metas.append([name, dtype_name(t.dtype), list(t.shape), offset, blob.nbytes])
        if blob.nbytes:
            parts.append(blob)  # the tensor's own bytes, no copy
            offset += blob.nbytes
    return metas, parts


def view_of(buffer: Any, dtype: str, shape: list[int], offset: int,
            released: Callable[[int], None] | None = None) -> torch.Tensor:
    """A tensor over ``buffer``'s bytes at ``offset`` (no copy). ``released(offset)`` is called once neither it
    nor any view of it is left."""
    np_dtype, view = _NUMPY[dtype]
    count = math.prod(shape) * itemsize(dtype) // np_dtype.itemsize
    array = np.frombuffer(buffer, np_dtype, count, offset)
    if released is not None:
        weakref.finalize(array, released, offset)  # the tensor's storage holds the array until the last view goes
    t = torch.from_numpy(array.reshape(shape))
    return t.view(view) if view is not None else t


def unpack_tensors(metas: list[list[Any]], body: bytearray, base: int, shared: Any = None,
                   release: Callable[[int], None] | None = None) -> Tensors:
    """The frame's tensors: views of ``body`` (its tensors start at ``base``), or of ``shared`` for placed ones,
    each of which calls ``release(offset)`` once nothing refers to it any more."""
    out: Tensors = {}
    for name, dtype, shape, offset, nbytes, *placed in metas:
        if not nbytes:
            out[name] = torch.empty(shape, dtype=dtype_from_name(dtype))
        elif not placed:
            out[name] = view_of(body, dtype, shape, base + offset)
        elif shared is None:
            raise UnavailableError("a placed tensor arrived where there is no shared memory")
        else:
            out[name] = view_of(shared, dtype, shape, offset, release)
    return out


def error_value(e: BaseException) -> list[Any]:
    """An exception as an answer: its message, HTTP status and Retry-After (overload, a worker starting again);
    an unexpected one is logged here, with an incident id that the answer names."""
    if isinstance(e, SwapserveError):
        return [str(e) or type(e).__name__, e.http_status, retry_after_s(e)]
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error answering a front (incident %s)", incident, exc_info=e)
    return [f"internal server error (incident {incident}; see the server log)", 500, None]


def error_from(value: list[Any]) -> SwapserveError:
    message, status, retry = value
    if retry is not None:
        return OverloadedError(message, retry_after=retry, http_status=status)
    return RemoteError(message, status)


class Peer(asyncio.BufferedProtocol):
    """One end of the connection. Make it with ``lambda: Peer(handler)`` for ``create_unix_server`` or
    ``create_unix_connection``."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
        self._big: bytearray | None = None
        self._big_head = self._big_got = 0
        self.shared: Any = None
        """The other side's arena, mapped here: where the tensors it places arrive."""

    # -- sending ------------------------------------------------------------------------------------------

    def _send(self, head: dict[str, Any], tensors: Mapping[str, torch.Tensor | Placed] | None = None) -> None:
        if self.transport is None or self.closed:
            raise UnavailableError("the connection to the node's controller is closed")
        parts: list[bytes | memoryview] = []
        if tensors:
            head["t"], parts = pack_tensors(tensors)
        packed = msgpack.packb(head, use_bin_type=True)
        body = sum(len(p) for p in parts)
        if body:
            parts.insert(0, _PAD[:-len(packed) % ALIGN])
        self.transport.writelines([PREFIX.pack(len(packed), body), packed, *parts])

    async def call(self, op: str, args: Any = None,
                   tensors: Mapping[str, torch.Tensor | Placed] | None = None) -> Answer:
        """The other side's answer: (value, tensors). Raises its error (RemoteError, OverloadedError), or
        UnavailableError if the connection closes first. Cancelling the call cancels it there."""
        i = next(self._ids)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._send({"c": i, "op": op, "a": args}, tensors)
        self._waiting[i] = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if self._waiting.pop(i, None) is not None and not self.closed:
                self._send({"x": i})
            raise

    def notice(self, op: str, args: Any = None, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._send({"c": 0, "op": op, "a": args}, tensors)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _release(self, offset: int) -> None:
        """A placed tensor is no longer referenced here: the sender may reuse its space."""
        if not self.closed:
            self.notice("free", offset)

    # -- receiving ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_got:]
        if self._start and SCRATCH_BYTES - self._end < SCRATCH_BYTES // 4:  # move the partial frame to the front
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start:self._end]
            self._start, self._end = 0, n
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_got += nbytes
            if self._big_got == len(self._big):
                big, self._big = self._big, None
                self._frame(big, self._big_head)
            return
        self._end += nbytes
        while self._end - self._start >= PREFIX.size:
            head, body = PREFIX.unpack_from(self._scratch, self._start)
            total = PREFIX.size + _payload(head, body)
            have = self._end - self._start
            if total > SCRATCH_BYTES:  # a large frame: read the rest straight into its own buffer
                frame = bytearray(total - PREFIX.size)
                got = have - PREFIX.size  # less than the frame: it is larger than the scratch
                frame[:got] = self._view[self._start + PREFIX.size:self._end]
                self._big, self._big_head, self._big_got = frame, head, got
                self._start = self._end = 0
                return
            if have < total:
                break
            frame = bytearray(self._view[self._start + PREFIX.size:self._start + total])
            self._start += total
            self._frame(frame, head)
        if self._start == self._end:
            self._start = self._end = 0

    def _frame(self, frame: bytearray, head_len: int) -> None:
        head = msgpack.unpackb(memoryview(frame)[:head_len], raw=False, strict_map_key=False)
        metas = head.get("t")
        tensors = unpack_tensors(metas, frame, head_len + -head_len % ALIGN, self.shared, self._release) \
            if metas else {}
        if "r" in head:
            fut = self._waiting.pop(head["r"], None)
            if fut is not None and not fut.done():
                if "e" in head:
                    fut.set_exception(error_from(head["e"]))
                else:
                    fut.set_result((head.get("v"), tensors))
        elif "x" in head:
            if (task := self._serving.pop(head["x"], None)) is not None:
                task.cancel()
        elif head["c"] == 0:
            try:
                self.handler.notice(self, head["op"], head.get("a"), tensors)
            except Exception:  # noqa: BLE001 - a bad notice must not break the connection
                log.exception("handling notice %r failed", head["op"])
        else:
            i = head["c"]
            self._serving[i] = asyncio.ensure_future(self._answer(i, self.handler.call(self, head["op"],
                                                                                          head.get("a"), tensors)))

    async def _answer(self, i: int, work: Awaitable[Answer]) -> None:
        try:
            value, tensors = await work
        except asyncio.CancelledError:
            return  # the caller gave up (or the connection is gone): nobody to answer
        except Exception as e:  # noqa: BLE001 - every failure becomes an answer
            head: dict[str, Any] = {"r": i, "e": error_value(e)}
            tensors = {}
        else:
            head = {"r": i, "v": value}
        finally:
            self._serving.pop(i, None)
        if self.closed:
            return
        try:
            self._send(head, tensors)
        except Exception as e:  # noqa: BLE001 - an answer that cannot be sent (a tensor of no wire dtype) fails
            self._send({"r": i, "e": error_value(e)})

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        gone = UnavailableError("the connection to the node's controller closed")
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(gone)
        serving, self._serving = self._serving, {}
        for task in serving.values():
            task.cancel()
        self.handler.lost(self)

    def eof_received(self) -> bool | None:
        return None  # close our end too


def _payload(head: int, body: int) -> int:
    """A frame's bytes after its prefix."""
    return head + (-head % ALIGN + body if body else 0)


__all__ = ["Answer", "Handler", "Peer", "Placed", "RemoteError", "Tensors", "error_from", "error_value", "pack_tensors",
           "unpack_tensors"]
