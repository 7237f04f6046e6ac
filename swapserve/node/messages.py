"""Messages between the controller and its worker processes (one per device).

Small typed records over a ``multiprocessing`` connection; tensor data never travels in them: it lies
in the worker's shared-memory IO slab (:mod:`swapserve.node.slab`) and messages carry
:class:`TensorRef` offsets. Every command carries an id; the worker answers each with exactly one
:class:`Reply`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from swapserve.heap import Frozen


@dataclass(frozen=True)
class TensorRef:
    offset: int
    """Byte offset in the IO slab."""
    dtype: str
    """Torch dtype name (``float16``)."""
    shape: tuple[int, ...]


# --- controller → worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class AddModel:
    """Make a model runnable on the worker's device; then the worker settles its heap (collects once and freezes
    what is alive, :func:`swapserve.heap.settle`), so that no full collection while it serves scans the models'
    objects. Answered with :class:`swapserve.heap.Frozen`."""

    id: int
    key: str
    """Host-store key of one version of a function's model."""
    artifact_path: str


@dataclass(frozen=True)
class RemoveModel:
    id: int
    key: str


@dataclass(frozen=True)
class Prepare:
    """Swap the model in once, capture its graphs for ``batches`` and time a resident run at each (deploy time,
    off the request path): answered with :class:`Prepared`."""

    id: int
    key: str
    batches: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Run:
    id: int
    key: str
    inputs: tuple[TensorRef, ...]
    out_offset: int
    """Where in the slab the worker may write outputs."""
    values: dict[str, float] = field(default_factory=dict)
    """Eviction values for the models on this device (the scheduler's expected reuse): those that changed since
    the messages before, which the worker keeps (a model never sent one counts 0.0)."""
    lane: int = 0
    """The engine lane to run in (1: beside lane 0, for a model wholly on the device — or, with ``fetch``,
    one it brings in first; the worker moves it to lane 0 if the side lane cannot run it)."""
    out_limit: int | None = None
    """End of the lane's slab region: outputs must end before it (None: the slab's end)."""
    fetch: bool = False
    """A side lane brings the model's missing bytes in by kernel before it runs (``SwapEngine.infer``)."""
    peer: int = -1
    """The device that lent the model (:class:`Lend`) to copy its missing bytes from; -1: from host."""
    peer_pages: tuple[int, ...] = ()
    """The lender's page for each of the model's slots."""
    place_ahead: bool = False
    """Lane 0 may place its pages (evictions, remaps) and start its copies while the run before it executes
    (``SwapEngine.place_ahead``)."""
    out_fallback: tuple[int, int] | None = None
    """Where outputs go, ``[offset, limit)``, if they do not fit before ``out_limit`` (a block the controller
    sized from the model's declared outputs: :mod:`swapserve.node.answers`)."""
    spin_s: float = 0.0
    """Once it has answered, the worker polls its pipe for the next command without sleeping for this long (the
    scheduler's ``spin_ms``, as the controller's loop does), while none of its lanes runs."""


@dataclass(frozen=True)
class DropHost:
    """The owner spilled this model's host buffer: unmap it (once no run uses it)."""

    id: int
    key: str


@dataclass(frozen=True)
class Evict:
    id: int
    key: str


@dataclass(frozen=True)
class Prefetch:
    """Copy a model in ahead of its requests, or a piece of it (lane 0; answered with a RunResult that has
    no outputs)."""

    id: int
    key: str
    values: dict[str, float] = field(default_factory=dict)
    """Eviction values, as for :class:`Run`."""
    max_bytes: int | None = None
    """Copy only about this many of the missing bytes (whole pages, in first-use order); None: all."""


@dataclass(frozen=True)
class MeasureCopy:
    """Time ``nbytes`` of pinned host→device copies starting at wall-clock ``start_at`` (so that several
    workers copy at once); with ``exec_probe``, execution of a fixed kernel with and without a concurrent
    copy, and of runs side by side in the device's lanes."""

    id: int
    nbytes: int
    start_at: float
    exec_probe: bool = False


@dataclass(frozen=True)
class ExportPages:
    """Answer with :class:`Exported`, then send the device's page descriptors (:func:`send_fds`) for peers to
    map (answered on the worker's receiving thread, as are the peer commands below)."""

    id: int


@dataclass(frozen=True)
class ImportPeer:
    """Followed by ``count`` descriptors (:func:`send_fds`): map peer device ``peer``'s pages, time a copy from
    them and answer with :class:`PeerResult`."""

    id: int
    peer: int
    count: int


@dataclass(frozen=True)
class DropPeer:
    """Unmap peer device ``peer``'s pages (its worker died: a new one shares its own), once the copies from them
    already launched here have landed; a run sent to copy from them copies from host instead. Nothing to do
    where none are mapped."""

    id: int
    peer: int


@dataclass(frozen=True)
class Lend:
    """Pin a wholly resident model for a peer to copy from (answered with :class:`Lent`) until :class:`Unlend`."""

    id: int
    key: str


@dataclass(frozen=True)
class Unlend:
    id: int
    key: str


@dataclass(frozen=True)
class Stop:
    id: int


Command = (AddModel | RemoveModel | Prepare | Run | Prefetch | DropHost | Evict | MeasureCopy | ExportPages
           | ImportPeer | DropPeer | Lend | Unlend | Stop)
PEER_COMMANDS = (ExportPages, ImportPeer, DropPeer, Lend, Unlend)
"""Handled on the worker's receiving thread, not behind its lanes' runs."""


# --- worker → controller ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidencyChange:
    """The device's pool after a command, as a change to the one the worker sent before (the controller applies
    them in order: :class:`swapserve.node.workers.Residency`)."""

    changed: dict[str, float]
    """Fraction of each model's pages present (1.0 = resident), for the models whose fraction changed."""
    gone: tuple[str, ...]
    """Models the pool no longer holds at all."""
    pool_bytes: int
    used_bytes: int


def residency_change(sent: dict[str, float], present: dict[str, float], pool_bytes: int,
                     used_bytes: int) -> ResidencyChange:
    """What turns ``sent`` (the fractions the controller has) into ``present``."""
    return ResidencyChange({m: f for m, f in present.items() if sent.get(m) != f},
                           tuple(m for m in sent if m not in present), pool_bytes, used_bytes)


@dataclass
class RunResult:
    """Not frozen: the worker stamps ``handled_ms``, ``received_at`` and ``answered_at`` on the result its lane made
    as it answers (a ``dataclasses.replace`` of its 16 fields, ~4 µs, was on the reply's way back)."""

    outputs: tuple[TensorRef, ...]
    wall_ms: float
    """Swap (if any) plus execution, as the worker timed it."""
    swapped: bool
    bytes_copied: int
    evicted: int = 0
    """Models this run took pages from (evictions, partial or whole)."""
    handled_ms: float = 0.0
    """The worker's time for the command: message received to reply ready."""
    phases_ms: dict[str, float] = field(default_factory=dict)
    """Where a run's ``wall_ms`` went: ``wait`` (for the lane or a capture), ``upload`` (inputs), ``place``
    (pinning, evictions, remaps), ``device`` (launch to landed, the outputs' copies into the IO slab landing with
    the run), ``output`` (enqueuing those copies)."""
    lane: int = 0
    """The lane it ran in (a side lane's run the worker handed to the first lane says 0)."""
    from_peer: bool = False
    """Its missing bytes came from the device that lent the model (not from host: it was resident, or the run
    had to capture a graph first)."""
    placed_ahead: bool = False
    """Its pages were placed, and its copies started, while the run before it executed (``Run.place_ahead``)."""
    remaps: int = 0
    """Slots its placement mapped onto other pages (``RunInfo.remaps``)."""
    remap_unmaps: int = 0
    """Of those, the slots that unmapped a page first (``RunInfo.remap_unmaps``)."""
    received_at: float = 0.0
    answered_at: float = 0.0
    """``time.perf_counter()`` in the worker when its message had been read and when the reply went out — the
    host's monotonic clock, which the controller shares, so that it can time the messages' way each way."""


@dataclass(frozen=True)
class Prepared:
    exec_ms: dict[int, float]
    """One resident run's time at each batch size prepared (ms), in the lane where resident runs mostly go."""
    first_ms: float = 0.0
    """The first runs, one at each batch size, summed (ms): the model swapped in and its graphs captured."""


@dataclass(frozen=True)
class CopyResult:
    h2d_GBps: float
    exec_ms: float = 0.0
    exec_copying_ms: float = 0.0
    exec_beside: tuple[float, ...] = ()
    """A run's time with k others beside it (index k-1) over its time alone, up to the device's lanes."""


@dataclass(frozen=True)
class Exported:
    count: int
    """Descriptors that follow the reply."""
    fds: tuple[int, ...] = ()
    """The descriptors as received (filled in by the controller's reader)."""


@dataclass(frozen=True)
class PeerResult:
    d2d_GBps: float
    """Copy bandwidth from the imported peer's pages into this device's memory (one page, best of five)."""


@dataclass(frozen=True)
class Lent:
    pages: tuple[int, ...] | None
    """The lender's page per slot of the model; None: not wholly resident there (nothing pinned)."""


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    result: RunResult | CopyResult | Exported | PeerResult | Lent | Frozen | None = None
    residency: ResidencyChange | None = None
    error: str = ""
    error_type: str = ""
    http_status: int = 500


@dataclass(frozen=True)
class Hello:
    """First message of a started worker."""

    device: str
    name: str
    pool_bytes: int
    h2d_GBps: float
    pid: int
    fetch_GBps: float = 0.0
    """Host→device bandwidth of a side lane's fetch (by kernel on a GPU), alone."""
    gpu: str = ""
    """The machine's GPU this worker sees, as its ``CUDA_VISIBLE_DEVICES`` names it (an index or a UUID: see
    :func:`swapserve.node.worker.only_gpu`); empty on a CPU."""


# --- the wire ----------------------------------------------------------------------------------------------


def send(conn: Connection, msg: Any) -> None:
    """Plain pickle at the highest protocol: both ends are swapserve's own processes, and this skips the
    ForkingPickler machinery ``Connection.send`` goes through on every message."""
    conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def recv_nowait(conn: Connection) -> Any | None:
    """The next message if one has begun to arrive, else None at once — for an event loop's reader, on a
    non-blocking descriptor. ``Connection.poll`` builds and tears down a selector on every call (two per reply:
    the one that finds it, the one that finds nothing more); this is one read that fails. Reads exactly one
    message in ``Connection``'s framing (a 4-byte big-endian length, or -1 and an 8-byte one), never past it:
    descriptors may follow it in the stream (:func:`recv_fds`)."""
    fd = conn.fileno()
    try:
        head = os.read(fd, 4)
    except BlockingIOError:
        return None
    if not head:
        raise EOFError
    (size,) = struct.unpack("!i", _read_exact(fd, 4, head))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    return pickle.loads(_read_exact(fd, size))


READ_BYTES = 1 << 16
"""What one read of :func:`recv_available` may take."""


def recv_available(conn: Connection) -> tuple[list[Any], bool]:
    """The messages that have arrived on non-blocking ``conn``, in one read where they fit in :data:`READ_BYTES`
    (a message begun in it is read to its end), and whether more may be waiting (the read filled its buffer);
    ``([], False)`` at once when nothing has arrived. One read per worker reply, where :func:`recv_nowait` makes
    three (the head, the body, and one that finds nothing more, raising). It reads past a message: never use it
    while descriptors may follow one (:func:`recv_fds`)."""
    fd = conn.fileno()
    try:
        data = os.read(fd, READ_BYTES)
    except BlockingIOError:
        return [], False
    if not data:
        raise EOFError
    more = len(data) == READ_BYTES
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 4:
            data += _read_exact(fd, 4 - (len(data) - pos))
        (size,) = struct.unpack_from("!i", data, pos)
        pos += 4
        if size == -1:
            if len(data) - pos < 8:
                data += _read_exact(fd, 8 - (len(data) - pos))
            (size,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        if len(data) - pos < size:
            data += _read_exact(fd, size - (len(data) - pos))
        out.append(pickle.loads(memoryview(data)[pos:pos + size]))
        pos += size
    return out, more


def _read_exact(fd: int, n: int, start: bytes = b"") -> bytes:
    """``n`` bytes (``start`` being the first of them) from non-blocking ``fd``, waiting up to :data:`FD_WAIT_S`
    for each part: a message that has begun arrives whole at once."""
    parts, got = [start], len(start)
    while got < n:
        try:
            part = os.read(fd, n - got)
        except BlockingIOError:
            if not select.select([fd], [], [], FD_WAIT_S)[0]:
                raise OSError(f"a message stopped arriving after {got} of {n} bytes") from None
            continue
        if not part:
            raise EOFError
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def allow_open_files() -> None:
    """Raise this process's limit on open descriptors to the most it may: a GPU's pages pass between workers
    as one descriptor each (512 for a 16 GiB pool, thousands for a whole H200), beyond a usual limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


FD_BATCH = 250
"""Descriptors per message (the kernel passes at most 253 in one)."""


FD_WAIT_S = 10.0
"""How long the receiving end waits for descriptors announced by a message it has read."""


@contextlib.contextmanager
def _socket_of(conn: Connection) -> Iterator[socket.socket]:
    """``conn``'s Unix socket as a socket object that waits up to :data:`FD_WAIT_S` for each call, whatever the
    descriptor's blocking mode (an event loop may have made it non-blocking: uvloop does), which is restored
    after (it belongs to the descriptor both share)."""
    blocking = os.get_blocking(conn.fileno())
    try:
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(FD_WAIT_S)
            yield s
    finally:
        os.set_blocking(conn.fileno(), blocking)


def send_fds(conn: Connection, fds: Sequence[int]) -> None:
    """Pass ``fds`` over ``conn`` (a Unix socket) right after a message that announces them; the other end
    calls :func:`recv_fds` right after reading that message."""
    with _socket_of(conn) as s:
        for i in range(0, len(fds), FD_BATCH):
            part = list(fds[i:i + FD_BATCH])
            socket.send_fds(s, [len(part).to_bytes(2, "little")], part)


def recv_fds(conn: Connection, count: int) -> list[int]:
    """The ``count`` descriptors :func:`send_fds` sent. Every batch is read even when some of its descriptors did
    not arrive (the kernel drops those past this process's open-file limit), so that the messages after them
    are read as messages; then OSError, with nothing left open."""
    out: list[int] = []
    short = 0
    with _socket_of(conn) as s:
        for i in range(0, count, FD_BATCH):
            want = min(FD_BATCH, count - i)
            msg, fds, _, _ = socket.recv_fds(s, 2, want)
            out += fds
            short += want - len(fds)
            if len(msg) != 2 or int.from_bytes(msg, "little") != want:
                short = count  # not a batch of ours: the stream is out of step
                break
    if short:
        for fd in out:
            os.close(fd)
        raise OSError(f"received {len(out)} of {count} descriptors (open-file limit "
                      f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
    return out
