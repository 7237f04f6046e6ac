"""A worker that dies after the node was ready is started again, through a real Node in this process with real
CPU workers: a function deployed while that happens serves on the new worker too, and a node stopped while it
happens stops the new worker with it."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from swapserve.node import workers as wk
from swapserve.node.controller import Node, NodeConfig

from .harness import Functions, in_node

pytestmark = pytest.mark.integration

CFG = dict(devices=("cpu",), pool_bytes=64 << 20, workspace_bytes=64 << 20, host_store_bytes=128 << 20)


async def _kill(node: Node) -> None:
    worker = node.dispatch._workers[0]
    os.kill(worker.process.pid, signal.SIGKILL)
    while not worker.dead:
        await asyncio.sleep(0.01)


def test_a_function_deployed_while_the_worker_starts_again_serves_on_it(functions: Functions, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    async def serves(node: Node, fn, inputs: dict[str, torch.Tensor]) -> None:
        result = await node.infer(fn.name, inputs)
        for got, want in zip(result.outputs.values(), fn.expected(*inputs.values())):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    async def body(node: Node) -> None:
        await node.deploy(functions.mlp.bundle)
        await _kill(node)
        await node.deploy(functions.pair.bundle)  # the worker is being started again meanwhile
        for _ in range(600):
            if node.is_ready():
                break
            await asyncio.sleep(0.1)
        assert node.is_ready(), "the worker was not started again"
        assert node.dispatch._workers[0].models == {m.key for m in node._models.values()}
        await serves(node, functions.mlp, {"x": torch.randn(2, 16)})
        await serves(node, functions.pair, {"x": torch.randn(1, 8), "ids": torch.tensor([[1, 2, 3]])})

    with caplog.at_level(logging.DEBUG, logger="swapserve.node.controller"):
        in_node(monkeypatch, NodeConfig(home=tmp_path / "home", **CFG), body)
    # Each model the worker added (the first one's, and the new worker's two) left its heap settled.
    settled = [r.getMessage() for r in caplog.records if "objects frozen" in r.getMessage()]
    assert len(settled) == 3, settled
    assert all(m.startswith("worker 0 (cpu) added ") and int(m.split(": ")[1].split()[0]) > 0 for m in settled)


def test_a_node_stopped_while_its_worker_starts_again_stops_the_new_one(functions: Functions, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node) -> None:
        await node.deploy(functions.mlp.bundle)
        await _kill(node)
        await asyncio.sleep(0.5)  # the new worker is starting: the node stops now (in_node)

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", **CFG), body)
    workers = [p for p in mp.active_children() if p.name.startswith("swapserve-worker")]
    assert not workers, f"left running: {workers}"


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.parametrize("kind", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_a_node_of_two_devices_serves_from_the_other_while_one_starts_again(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The node stays ready with one worker dead: its device is out of service (status says so), requests run
    on the other, and once the new worker has its models (and the workers their pages shared anew) both
    serve again."""
    fn = functions.mlp
    devices = (f"{kind}:0", f"{kind}:1")

    async def body(node: Node) -> None:
        await node.deploy(fn.bundle)
        x = torch.randn(2, 16)
        (want,) = fn.expected(x)
        dead = node.dispatch._workers[1]
        os.kill(dead.process.pid, signal.SIGKILL)
        while not dead.dead:
            await asyncio.sleep(0.01)
        assert node.is_ready()
        assert [d.serving for d in node.snapshot().devices] == [True, False]
        during = 0
        for _ in range(900):
            out = not node.snapshot().devices[1].serving
            result = await node.infer(fn.name, {"x": x})
            torch.testing.assert_close(next(iter(result.outputs.values())), want, rtol=1e-4, atol=1e-5)
            if out and not node.snapshot().devices[1].serving:  # out before and after: it ran on the other
                assert result.device == devices[0]
                during += 1
            elif not out:
                break
            await asyncio.sleep(0.05)
        assert during > 0 and node.is_ready()
        assert [d.serving for d in node.snapshot().devices] == [True, True], "the worker was not started again"
        assert node.dispatch._workers[1] is not dead and node.dispatch._workers[1].models == {
            m.key for m in node._models.values()}

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=devices, pool_bytes=64 << 20,
                                    workspace_bytes=64 << 20, host_store_bytes=128 << 20), body)


def test_a_worker_that_does_not_stop_in_time_writes_its_threads_stacks_before_it_is_ended(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(node: Node) -> None:
        await node.deploy(functions.heavy.bundle)
        worker = node.dispatch._workers[0]
        run = asyncio.ensure_future(node.infer("heavy", {"x": torch.randn(4, 1024)}))
        while not any(node.dispatch._inflight.values()):  # sent to the worker: a run of ~1 s there
            await asyncio.sleep(0.01)
        await wk.stop(worker, 0.05)  # what the node's stop does, with less time than the run takes
        assert not worker.process.is_alive()
        run.cancel()

    with caplog.at_level(logging.WARNING, logger="swapserve.node.workers"):
        in_node(monkeypatch, NodeConfig(home=tmp_path / "home", **CFG), body, grace_s=0.0)
    assert any("worker 0 did not stop in time" in r.getMessage() for r in caplog.records)
    assert any("worker 0 still ran" in r.getMessage() for r in caplog.records)  # how late it was, then ended
    err = capfd.readouterr().err
    assert "most recent call first" in err and "_serve_lane" in err, err[-3000:]  # the lane, busy with the run
