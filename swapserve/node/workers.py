"""The controller's handle on its worker processes: spawn, call, watch, stop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from swapserve.errors import BackendError
from swapserve.node.messages import (Exported, ExportPages, Hello, Reply, ResidencyChange, Run, Stop, recv,
                                     recv_available, recv_fds, recv_nowait, send_fds)
from swapserve.node.messages import send as send_msg
from swapserve.node.slab import Slab
from swapserve.node.worker import STACKS_SIGNAL, WorkerConfig, worker_main

log = logging.getLogger(__name__)

_ids = itertools.count(1)


def next_id() -> int:
    return next(_ids)


@dataclass
class Residency:
    """A worker's pool as the controller knows it: the changes it reported (with its replies), applied in order."""

    present: dict[str, float] = field(default_factory=dict)
    """Fraction of each model's pages present (1.0 = resident), by host-store key."""
    pool_bytes: int = 0
    used_bytes: int = 0
    changed: set[str] = field(default_factory=set)
    """Keys whose fraction changed (or that left) since the dispatcher last read them."""

    def apply(self, change: ResidencyChange) -> None:
        self.present.update(change.changed)
        for key in change.gone:
            self.present.pop(key, None)
        self.changed.update(change.changed, change.gone)
        self.pool_bytes, self.used_bytes = change.pool_bytes, change.used_bytes


@dataclass
class WorkerHandle:
    index: int
    config: WorkerConfig
    process: mp.process.BaseProcess
    conn: Connection
    slab: Slab
    lane_conns: tuple[Connection, ...] = ()
    """The write ends of the side lanes' own pipes (lane 1 at 0): a side lane's plain runs go there
    (:func:`direct`), read by that lane's thread itself."""
    hello: Hello | None = None
    residency: Residency = field(default_factory=Residency)
    pending: dict[int, asyncio.Future[Reply] | Callable[[Reply | BaseException], None]] = field(default_factory=dict)
    """Per command id: a future to resolve, or (hot path) a callback called with the reply right away."""
    dead: bool = False
    stopping: bool = False
    models: set[str] = field(default_factory=set)
    """Keys of the models added to it (and not removed), as sent."""
    exporting: set[int] = field(default_factory=set)
    """Ids of the :class:`ExportPages` commands sent and not yet answered: while any is, its replies are read one
    message at a time (descriptors follow the answer in the stream; a read past it would drop them)."""

    @property
    def device(self) -> str:
        return self.config.device


def spawn(cfg: WorkerConfig) -> WorkerHandle:
    """Start a worker process (spawned: a fresh interpreter, so CUDA is initialised only there)."""
    ctx = mp.get_context("spawn")
    slab = Slab(Path(cfg.slab_path), cfg.slab_bytes, create=True, answers_bytes=cfg.answers_bytes)
    parent, child = ctx.Pipe(duplex=True)
    lanes = [ctx.Pipe(duplex=False) for _ in range(cfg.engine.lanes - 1)]  # (the lane's end, ours)
    proc = ctx.Process(target=worker_main, args=(cfg, child, tuple(r for r, _ in lanes)),
                       name=f"swapserve-worker{cfg.index}", daemon=True)
    proc.start()
    child.close()
    for r, _ in lanes:
        r.close()
    return WorkerHandle(cfg.index, cfg, proc, parent, slab, tuple(w for _, w in lanes))


def direct(msg: Any) -> int:
    """The side lane whose own pipe ``msg`` goes on, or 0 for the worker's main connection: a side lane's run that
    carries no eviction values (those are applied in the order the main connection brings them) and copies from
    no peer. Fetch runs go there too (most side-lane runs may fetch; with their model whole they evict nothing):
    one that evicts orders by the values the receiver has applied by then. The lane's thread reads it itself: no
    hand-off from the worker's receiving thread, whose wake-up of the lane was ~31 µs of a request's ~0.57 ms
    outside its run on an H200 (the thirty-sixth session's timeline, ``bench/results/h200_20261201/session36/``)."""
    return msg.lane if type(msg) is Run and msg.lane > 0 and not msg.values and msg.peer < 0 else 0


async def wait_hello(w: WorkerHandle, timeout: float) -> Hello:
    loop = asyncio.get_running_loop()

    def first() -> Any:
        if not w.conn.poll(timeout):
            raise BackendError(f"worker {w.index} ({w.device}) did not start within {timeout:.0f} s")
        return recv(w.conn)

    try:
        msg = await loop.run_in_executor(None, first)
    except EOFError:
        raise BackendError(f"worker {w.index} ({w.device}) exited while starting (exit code "
                           f"{w.process.exitcode}); see its log above") from None
    if not isinstance(msg, Hello):
        raise BackendError(f"worker {w.index} sent {type(msg).__name__} before its hello")
    w.hello = msg
    return msg


def watch(w: WorkerHandle, on_dead: Any) -> None:
    """Read the worker's replies as they arrive, from the event loop."""
    loop = asyncio.get_running_loop()
    os.set_blocking(w.conn.fileno(), False)  # as uvloop's reader leaves it; asyncio's would not

    def take(reply: Reply) -> None:
        if isinstance(reply.result, Exported):  # its descriptors are right behind it
            try:
                fds = recv_fds(w.conn, reply.result.count)
            except OSError as e:  # read to their end: the worker is fine, its pages are not ours
                reply = Reply(reply.id, False, error=f"its pages' descriptors: {e}", error_type="BackendError")
            else:
                reply = replace(reply, result=Exported(len(fds), tuple(fds)))
        w.exporting.discard(reply.id)
        waiter = w.pending.pop(reply.id, None)
        if reply.residency is not None:
            w.residency.apply(reply.residency)
        if callable(waiter):
            waiter(reply)
        elif waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def readable() -> None:
        try:
            while True:
                if w.exporting:
                    if (reply := recv_nowait(w.conn)) is None:
                        return
                    take(reply)
                    continue
                replies, more = recv_available(w.conn)
                failed: Exception | None = None
                for reply in replies:  # every one read is taken, even past a callback that raised (a bug)
                    try:
                        take(reply)
                    except (EOFError, OSError):
                        raise
                    except Exception as e:  # noqa: BLE001 - raised below, after the others
                        failed = failed or e
                if failed is not None:
                    raise failed
                if not more:
                    return
        except (EOFError, OSError):
            loop.remove_reader(w.conn.fileno())
            w.dead = True
            dead = BackendError(f"worker {w.index} ({w.device}) died")
            waiters, w.pending = list(w.pending.values()), {}
            for waiter in waiters:
                if callable(waiter):
                    waiter(dead)
                elif not waiter.done():
                    waiter.set_exception(dead)
            if not w.stopping:
                on_dead(w)

    loop.add_reader(w.conn.fileno(), readable)


def send(w: WorkerHandle, msg: Any, on_reply: Callable[[Reply | BaseException], None]) -> None:
    """Send now; ``on_reply`` runs in the event loop as soon as the reply (or the worker's death) arrives —
    no task, no extra loop iteration on the request path."""
    if w.dead:
        raise BackendError(f"worker {w.index} ({w.device}) is not running")
    w.pending[msg.id] = on_reply
    lane = direct(msg)
    send_msg(w.lane_conns[lane - 1] if 0 < lane <= len(w.lane_conns) else w.conn, msg)


async def call(w: WorkerHandle, msg: Any, fds: Sequence[int] = ()) -> Reply:
    """Send ``msg`` (followed by descriptors ``fds``, if any) and wait for its reply."""
    if w.dead:
        raise BackendError(f"worker {w.index} ({w.device}) is not running")
    fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    w.pending[msg.id] = fut
    if isinstance(msg, ExportPages):
        w.exporting.add(msg.id)
    send_msg(w.conn, msg)
    if fds:
        send_fds(w.conn, fds)
    return await fut


def dump_stacks(w: WorkerHandle) -> None:
    """Have the worker write every thread's stack to its standard error (``faulthandler`` on
    :data:`~swapserve.node.worker.STACKS_SIGNAL`), which the node's log holds: what held one that did not stop."""
    if w.process.pid is not None and w.process.is_alive():
        try:
            os.kill(w.process.pid, STACKS_SIGNAL)
        except ProcessLookupError:  # ended meanwhile
            pass


EXIT_S = 120.0
"""How long a worker that answered its Stop may take to exit before it is killed."""


async def stop(w: WorkerHandle, timeout: float) -> None:
    w.stopping = True
    told, late, answered = time.monotonic(), False, False
    if not w.dead:
        try:
            await asyncio.wait_for(call(w, Stop(next_id())), timeout)
            answered = True
        except (asyncio.TimeoutError, BackendError, OSError):
            late = True
            if w.process.is_alive():
                log.warning("worker %d did not stop in time (%.1f s); killing it (what its threads were doing "
                            "follows in its log)", w.index, timeout)
                dump_stacks(w)
            else:
                log.warning("worker %d did not stop in time (%.1f s) but has ended since", w.index, timeout)
    try:
        asyncio.get_running_loop().remove_reader(w.conn.fileno())
    except (ValueError, OSError):
        pass
    # A worker that answered ends by itself, and its exit frees its device memory and page locks, which can take
    # seconds (the workers of an N = 800 node on two H200s, a 187 GB host store, ended 12-15 s after they were
    # told). Waited for off the event loop, where the other workers' answers to their Stop come meanwhile (a join
    # here held them: they timed out).
    await asyncio.to_thread(w.process.join, EXIT_S if answered else max(0.1, timeout))
    if late:  # how late: a worker that ends soon after its time was slow, not stuck
        log.warning("worker %d %s %.1f s after it was told to stop", w.index,
                    "still ran" if w.process.is_alive() else "had ended by", time.monotonic() - told)
    if w.process.is_alive():  # killed: a worker ignores SIGTERM (worker_main)
        w.process.kill()
        await asyncio.to_thread(w.process.join, 5.0)
    w.conn.close()
    for c in w.lane_conns:
        c.close()
    w.slab.close()
    Path(w.config.slab_path).unlink(missing_ok=True)
