"""A real worker process with two lanes: the messages the controller sends, answered from each lane."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from swapserve.config import MiB, EngineConfig
from swapserve.engine import HostStore
from swapserve.node import workers as wk
from swapserve.node.messages import AddModel, Run
from swapserve.node.worker import WorkerConfig

pytestmark = pytest.mark.integration


def _with_worker(shm_dir: Path, arts: dict[str, Any], pool_mib: int,
                 body: Callable[[wk.WorkerHandle], Awaitable[None]]) -> None:
    """A CPU worker of two lanes holding ``arts`` (by key) in a pool of ``pool_mib``: ``body`` talks to it, then
    it stops cleanly."""
    store = HostStore(shm_dir / "store", 256 * MiB)
    for key, art in arts.items():
        store.add(key, art)
    cfg = WorkerConfig(0, "cpu", EngineConfig(device="cpu", pool_bytes=pool_mib * MiB, page_bytes=2 * MiB, lanes=2),
                       str(store.root), str(shm_dir / "io-0.bin"), 16 * MiB)

    async def main() -> None:
        w = wk.spawn(cfg)
        try:
            await wk.wait_hello(w, 120)
            wk.watch(w, lambda _w: None)
            for key, art in arts.items():
                assert (await wk.call(w, AddModel(wk.next_id(), key, str(art.path)))).ok
            await body(w)
        finally:
            await wk.stop(w, 30)
        assert w.process.exitcode == 0

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_side_lane_serves_resident_models_and_hands_the_rest_to_lane_0(make_artifact, shm_dir: Path) -> None:
    a, module_a, (xa,) = make_artifact("mlp", seed=11, name="a")
    b, module_b, (xb,) = make_artifact("tied", seed=12, name="b")

    async def body(w: wk.WorkerHandle) -> None:
        async def run(key: str, x: torch.Tensor, lane: int) -> tuple[torch.Tensor, bool]:
            start, limit = w.slab.region(lane, 2)
            refs, end = w.slab.write_batch([[x]], start, limit)
            reply = await wk.call(w, Run(wk.next_id(), key, refs, end, {}, lane, limit))
            assert reply.ok, reply.error
            out = reply.result.outputs[0]
            assert start <= out.offset < limit  # the answer stayed in the lane's region
            return w.slab.tensor(out).clone(), reply.result.swapped

        with torch.no_grad():
            want_a, want_b = module_a(xa), module_b(xb)
        out, swapped = await run("a", xa, lane=1)  # not on the device: lane 0 swaps it in instead
        assert swapped and torch.allclose(out, want_a, rtol=1e-5, atol=1e-5)
        first = out
        out, swapped = await run("a", xa, lane=1)  # now resident: lane 1 runs it
        assert not swapped and torch.equal(out, first)
        # Both lanes at once: b swaps in on lane 0 while lane 1 answers a, over and over.
        for _ in range(5):
            (ra, sa), (rb, _) = await asyncio.gather(run("a", xa, 1), run("b", xb, 0))
            assert not sa and torch.equal(ra, first)
            assert torch.allclose(rb, want_b, rtol=1e-5, atol=1e-5)

    _with_worker(shm_dir, {"a": a, "b": b}, 64, body)


def _cpu_s(pid: int) -> float:
    """The process's CPU time so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_after_answering_a_run_the_worker_polls_for_the_next_command_for_its_spin_s(make_artifact,
                                                                                     shm_dir: Path) -> None:
    """``Run.spin_s``: once it has answered, the worker reads its pipe without sleeping for that long (it burns
    that CPU time), so that the next command is not read only after its thread is woken; with 0 it sleeps."""
    a, module_a, (xa,) = make_artifact("mlp", seed=13, name="a")

    async def body(w: wk.WorkerHandle) -> None:
        async def run(spin_s: float) -> torch.Tensor:
            start, limit = w.slab.region(0, 2)
            refs, end = w.slab.write_batch([[xa]], start, limit)
            reply = await wk.call(w, Run(wk.next_id(), "a", refs, end, {}, 0, limit, spin_s=spin_s))
            assert reply.ok, reply.error
            return w.slab.tensor(reply.result.outputs[0]).clone()

        first = await run(0.0)
        used = []
        for spin_s in (0.0, 0.6, 0.0):
            assert torch.equal(await run(spin_s), first)
            before = _cpu_s(w.process.pid)
            await asyncio.sleep(0.8)
            used.append(_cpu_s(w.process.pid) - before)
        # Polled through most of its 0.6 s (on a busy CI box, at least a third of it); asleep otherwise.
        assert used[1] >= 0.2 and used[0] < 0.1 and used[2] < 0.1, used
        # A command that comes while it polls is served as any other.
        assert torch.equal(await run(0.6), first) and torch.equal(await run(0.6), first)

    _with_worker(shm_dir, {"a": a}, 64, body)


def test_lane_0_places_the_next_runs_pages_while_a_run_executes(make_artifact, shm_dir: Path) -> None:
    """Runs of a and b, sent back to back to lane 0 through a pool that holds one of them: each next run's
    pages are placed while the one before it executes (``Run.place_ahead``), and every answer is its model's."""
    a, module_a, (xa,) = make_artifact("mlp", seed=31, name="a")
    b, module_b, (xb,) = make_artifact("tied", seed=32, name="b")
    with torch.no_grad():
        want = {"a": module_a(xa), "b": module_b(xb)}

    async def body(w: wk.WorkerHandle) -> None:
        ahead = 0
        for _ in range(3):
            runs = []
            for i, (key, x) in enumerate((("a", xa), ("b", xb), ("a", xa), ("b", xb))):
                start, limit = w.slab.region(i, 4)
                refs, end = w.slab.write_batch([[x]], start, limit)
                runs.append(wk.call(w, Run(wk.next_id(), key, refs, end, {}, 0, limit, place_ahead=True)))
            replies = await asyncio.gather(*runs)
            for reply, key in zip(replies, "abab"):
                assert reply.ok, reply.error
                assert reply.result.swapped
                out = w.slab.tensor(reply.result.outputs[0])
                torch.testing.assert_close(out, want[key], rtol=1e-5, atol=1e-5)
            assert not replies[0].result.placed_ahead  # nothing ran before it
            ahead += sum(r.result.placed_ahead for r in replies)
        # Sent together: the next run is there when the one before it launches (but for a slow receiver).
        assert ahead >= 1

    _with_worker(shm_dir, {"a": a, "b": b}, 12, body)


def test_the_worker_keeps_the_eviction_values_sent_before(make_artifact, shm_dir: Path) -> None:
    """Each run carries only the values that changed (Dispatcher._values): the worker keeps the rest, so a swap
    evicts the least valuable model even when its message values only itself."""
    arts = {k: make_artifact("mlp", seed=s, name=k)[0] for k, s in (("a", 1), ("b", 2), ("c", 3))}
    x = torch.randn(1, 512)

    async def body(w: wk.WorkerHandle) -> None:
        async def run(key: str, values: dict[str, float]) -> None:
            start, limit = w.slab.region(0, 2)
            refs, end = w.slab.write_batch([[x]], start, limit)
            reply = await wk.call(w, Run(wk.next_id(), key, refs, end, values, 0, limit))
            assert reply.ok, reply.error

        await run("a", {"a": 5.0})
        await run("b", {"b": 1.0})  # the pool holds two of the three
        assert w.residency.present == {"a": 1.0, "b": 1.0}
        await run("c", {"c": 2.0})  # a was used first, but is worth more than b: b goes
        assert w.residency.present.get("a") == 1.0 and w.residency.present.get("c") == 1.0
        assert w.residency.present.get("b", 0.0) < 1.0

    _with_worker(shm_dir, arts, 16, body)


def test_runs_sent_to_both_lanes_with_a_stop_behind_them_are_all_answered_first(make_artifact, shm_dir: Path) -> None:
    """Runs sent to both lanes back to back, the Stop right behind them: every run is answered (its model's
    output) before the Stop, which waits for both lanes, and the worker exits cleanly."""
    from swapserve.node.messages import Stop

    a, module_a, (xa,) = make_artifact("mlp", seed=21, name="a")
    b, module_b, (xb,) = make_artifact("tied", seed=22, name="b")
    with torch.no_grad():
        want = {"a": module_a(xa), "b": module_b(xb)}

    async def body(w: wk.WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        start, limit = w.slab.region(0, 7)
        refs, end = w.slab.write_batch([[xa]], start, limit)
        assert (await wk.call(w, Run(wk.next_id(), "a", refs, end, {}, 0, limit))).ok  # a resident: lane 1 runs it
        replies: list[tuple[str, Any]] = []
        done = loop.create_future()

        def sent(what: str) -> Any:
            def on_reply(reply: Any) -> None:
                replies.append((what, reply))
                if len(replies) == 7:
                    done.set_result(None)
            return on_reply

        for i in range(6):
            key, x, lane = ("b", xb, 0) if i % 2 else ("a", xa, 1)
            start, limit = w.slab.region(i + 1, 7)
            refs, end = w.slab.write_batch([[x]], start, limit)
            wk.send(w, Run(wk.next_id(), key, refs, end, {}, lane, limit, spin_s=0.001 * (i % 3)), sent(f"{key}{i}"))
        wk.send(w, Stop(wk.next_id()), sent("stop"))
        await asyncio.wait_for(done, 60)
        order = [what for what, _ in replies]
        assert order[-1] == "stop" and sorted(order[:-1]) == ["a0", "a2", "a4", "b1", "b3", "b5"], order
        for what, reply in replies:
            assert not isinstance(reply, BaseException) and reply.ok, (what, reply)
            if what != "stop":  # each run's answer in its own region of the slab
                torch.testing.assert_close(w.slab.tensor(reply.result.outputs[0]), want[what[0]], rtol=1e-5, atol=1e-5)
        await asyncio.to_thread(w.process.join, 30)
        await asyncio.sleep(0.1)  # the pipe's end is read (the worker is marked dead, not stopped again)

    _with_worker(shm_dir, {"a": a, "b": b}, 64, body)


def test_side_lane_runs_on_its_own_pipe_and_through_the_receiver_interleave(make_artifact, shm_dir: Path) -> None:
    """Side-lane runs sent as the controller sends them (:func:`workers.send`): plain ones on the lane's own pipe,
    read by its thread, and ones carrying eviction values through the worker's receiver, which queues them for the
    lane and wakes it. Alternated, polling after each answer or not, every one is answered with its model's
    output."""
    a, module_a, (xa,) = make_artifact("mlp", seed=31, name="a")
    with torch.no_grad():
        want = module_a(xa)

    async def body(w: wk.WorkerHandle) -> None:
        start, limit = w.slab.region(1, 2)
        refs, end = w.slab.write_batch([[xa]], start, limit)
        assert (await wk.call(w, Run(wk.next_id(), "a", refs, end, {}, 0, limit))).ok  # resident from here on
        loop = asyncio.get_running_loop()
        for i in range(12):
            values = {"a": float(i)} if i % 3 == 0 else {}
            run = Run(wk.next_id(), "a", refs, end, values, 1, limit, spin_s=0.002 * (i % 2))
            assert wk.direct(run) == (0 if values else 1)
            answered: asyncio.Future[Any] = loop.create_future()
            wk.send(w, run, answered.set_result)
            reply = await asyncio.wait_for(answered, 30)
            assert not isinstance(reply, BaseException) and reply.ok, reply
            assert reply.result.lane == 1 and not reply.result.swapped
            torch.testing.assert_close(w.slab.tensor(reply.result.outputs[0]), want, rtol=1e-5, atol=1e-5)

    _with_worker(shm_dir, {"a": a}, 64, body)
