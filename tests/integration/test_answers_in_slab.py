"""Large answers written to a block of the worker's IO slab and answered from there, through a real Node in this
process with a real worker (a CPU's, and a GPU's where there is one): the outputs are right, they are the slab's
bytes (no copy), and a run's block comes back once the last of its answers is gone. Without a free block, or when
a model writes more than it declares, the outputs are copied out of the lane's region as before: still right, and
nothing is held."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch

from swapserve.node import controller
from swapserve.node.controller import Node, NodeConfig

from .harness import Functions, in_node

pytestmark = pytest.mark.integration

ROW = 327680 * 4
"""Bytes of one row of ``wide``'s output (1.25 MiB: over the 1 MiB that is copied instead)."""


async def _held(node: Node) -> int:
    """What the worker's answers part holds once the loop has run the callbacks a finished run leaves behind."""
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    return node.dispatch._workers[0].slab.answers.held_bytes


def _in_answers(node: Node, t: torch.Tensor) -> bool:
    slab = node.dispatch._workers[0].slab
    base = slab.buffer.data_ptr()
    return base + slab.answers.start <= t.data_ptr() < base + slab.answers.end


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_large_answers_come_from_the_slab_until_it_is_full(functions: Functions, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    fn = functions.wide

    async def check(node: Node, x: torch.Tensor) -> tuple[object, bool]:
        result = await node.infer(fn.name, {"x": x})
        (got,) = result.outputs.values()
        # Batched: another summing order; on a GPU, another machine's arithmetic.
        torch.testing.assert_close(got, fn.expected(x)[0], rtol=1e-4, atol=1e-5 if device == "cpu" else 1e-4)
        return result, _in_answers(node, got)

    async def body(node: Node) -> None:
        await node.deploy(fn.bundle)
        result, there = await check(node, torch.randn(2, 16))
        assert there and await _held(node) >= 2 * ROW
        del result
        assert await _held(node) == 0
        # A burst (one batch or several): held until the last of its answers goes.
        results = await asyncio.gather(*(check(node, torch.randn(1, 16)) for _ in range(4)))
        assert all(there for _, there in results)
        results.pop()
        assert await _held(node) > 0
        results.clear()
        assert await _held(node) == 0
        # Answers kept: room for four rows, then copied out of the region.
        kept = [await check(node, torch.randn(1, 16)) for _ in range(5)]
        assert [there for _, there in kept] == [True] * 4 + [False]
        kept.clear()
        assert await _held(node) == 0
        # A model that writes more than it declares: its outputs go to the region, its block comes back.
        declared = controller._Model.answer_bytes
        monkeypatch.setattr(controller._Model, "answer_bytes", lambda self, items: declared(self, items) - 1024)
        result, there = await check(node, torch.randn(3, 16))
        assert not there and await _held(node) == 0

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=(device,), pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20,
                                    answers_bytes=4 * ROW + 1024), body)
