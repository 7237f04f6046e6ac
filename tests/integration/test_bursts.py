"""A burst's requests that reach an idle node together leave in one batch (``dispatch.ARRIVAL_TURNS``): the
first is not sent alone with the others waiting for its run; and the scheduler knows what a batch costs from
deploy on (a resident run timed at every batch size the model runs at), rather than the batch-1 time times its
size, and counts its arrivals from then on. Through a real Node in this process with a real CPU worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from swapserve.node.controller import Node, NodeConfig

from .harness import Functions, in_node, metric

pytestmark = pytest.mark.integration


async def _runs(node: Node) -> float:
    """Runs counted so far: a run is counted right after its answers (one turn of the loop)."""
    await asyncio.sleep(0)
    return metric(node.metrics.render().decode(), "swapserve_compute_seconds_count", device="cpu")


def test_requests_arriving_together_run_as_one_batch_timed_at_deploy(functions: Functions, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node) -> None:
        deployed_from = node.clock()
        await node.deploy(functions.mlp.bundle)  # max batch 8
        # Its arrivals are counted from the deploy on (the rate read as λ corrected for so short a history).
        assert deployed_from <= node.state.queues[functions.mlp.name].counted_since <= node.clock()
        timed = node.state.profiles[functions.mlp.name].exec_ms
        assert sorted(timed) == [1, 2, 4, 8] and all(ms > 0 for ms in timed.values()), timed
        x = torch.randn(1, 16)
        await node.infer(functions.mlp.name, {"x": x})  # resident from here on
        before = await _runs(node)
        xs = [torch.randn(1, 16) for _ in range(3)]
        results = await asyncio.gather(*(node.infer(functions.mlp.name, {"x": xi}) for xi in xs))
        for xi, r in zip(xs, results):
            (got,) = r.outputs.values()
            torch.testing.assert_close(got, functions.mlp.expected(xi)[0])
        assert await _runs(node) - before == 1, "three requests that arrived together ran apart"

        # One alone is decided within the same few turns of the loop: answered as before.
        alone = await node.infer(functions.mlp.name, {"x": x})
        torch.testing.assert_close(next(iter(alone.outputs.values())), functions.mlp.expected(x)[0])
        assert await _runs(node) - before == 2

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20), body)
