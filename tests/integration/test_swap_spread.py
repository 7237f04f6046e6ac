"""Swaps spread over a node's devices. Requests one at a time leave every device idle at each decision, and a
model on neither finishes alike on both: on two H200s such ties went to the first device, which took 2.5-6
times the second's swaps in every replay (session 25). Through a real Node in this process with two CPU workers
whose pools hold four of the ten models each."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from swapserve.functions.build import build_bundle
from swapserve.node.controller import Node, NodeConfig

from .harness import in_node, spec_dict, write_function_dir

pytestmark = pytest.mark.integration

MODEL_PY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 8))
    return model.eval(), (torch.randn(1, 64),)
'''
FUNCTIONS = 10
ROUNDS = 4


def test_swaps_between_idle_devices_go_to_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundles = []
    for i in range(FUNCTIONS):
        name = f"m{i}"
        src = write_function_dir(tmp_path / "src" / name,
                                 spec_dict(name, [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
                                           [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}], max_batch=4),
                                 MODEL_PY.replace("SEED", str(i)))
        bundles.append(tmp_path / "bundles" / name)
        build_bundle(src, bundles[-1], progress=lambda line: None)
    swaps: Counter[str] = Counter()

    async def body(node: Node) -> None:
        for b in bundles:
            await node.deploy(b)
        x = torch.randn(1, 64)
        for _ in range(ROUNDS):  # a cycle longer than both pools hold: every request's model is on no device
            for i in range(FUNCTIONS):
                result = await node.infer(f"m{i}", {"x": x})
                if result.swapped:
                    swaps[result.device] += 1

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cpu:0", "cpu:1"), pool_bytes=8 << 20,
                                    page_bytes=2 << 20, workspace_bytes=64 << 20, host_store_bytes=256 << 20), body)
    total = sum(swaps.values())
    # The cycle misses, as meant: 19-32 of the 40 requests swapped in runs of this test (what stays resident and
    # what comes in pieces, counted unswapped, turn on the timing); half was one too many on the CI box once.
    assert total >= FUNCTIONS * ROUNDS // 4, swaps
    assert min(swaps["cpu:0"], swaps["cpu:1"]) >= total // 4, swaps
