"""``workers.stop`` as the node calls it, on every worker at once: a worker that answered its Stop but takes long
to exit (the kernel freeing its page locks: 12-15 s for a 187 GB host store on two H200s) must hold neither the
event loop nor the other workers' stops. The processes here are real, standing in for workers at the pipe."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from swapserve.config import EngineConfig
from swapserve.node import workers as wk
from swapserve.node.messages import Reply, recv, send
from swapserve.node.slab import Slab
from swapserve.node.worker import WorkerConfig


def _stops(conn: Connection, answer_after_s: float, exit_after_s: float) -> None:
    """A worker's end of the pipe: up, its Stop answered after ``answer_after_s``, then ``exit_after_s`` to end."""
    send(conn, "up")
    msg = recv(conn)
    time.sleep(answer_after_s)
    send(conn, Reply(msg.id, True))
    time.sleep(exit_after_s)


def _worker(tmp_path: Path, index: int, answer_after_s: float, exit_after_s: float) -> wk.WorkerHandle:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_stops, args=(child, answer_after_s, exit_after_s), daemon=True)
    process.start()
    child.close()
    assert recv(parent) == "up"  # started (the test's imports, in a fresh interpreter, take a while)
    cfg = WorkerConfig(index, "cpu", EngineConfig(), str(tmp_path), str(tmp_path / f"slab{index}"), 1 << 16)
    return wk.WorkerHandle(index, cfg, process, parent, Slab(Path(cfg.slab_path), cfg.slab_bytes, create=True))


def test_a_workers_slow_exit_holds_neither_the_loop_nor_the_others_stops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> float:
        handles = [_worker(tmp_path, 0, 0.0, 2.0), _worker(tmp_path, 1, 0.5, 0.0)]
        for w in handles:
            wk.watch(w, on_dead=lambda w: None)
        ticks, stopping = [time.monotonic()], asyncio.ensure_future(
            asyncio.gather(*(wk.stop(w, 1.5) for w in handles)))
        while not stopping.done():
            await asyncio.sleep(0.02)
            ticks.append(time.monotonic())
        await stopping
        assert not any(w.process.is_alive() for w in handles)
        assert handles[0].process.exitcode == 0, "it answered: its exit was waited for, past the Stop's time"
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    with caplog.at_level(logging.WARNING, logger="swapserve.node.workers"):
        longest_tick = asyncio.run(main())
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # worker 1 answered within its time
    assert longest_tick < 0.5, f"the event loop was held {longest_tick:.2f} s"
    assert not list(tmp_path.glob("slab*")), "every slab file removed"
