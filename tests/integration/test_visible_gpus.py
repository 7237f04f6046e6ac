"""A node told which GPUs it may use (``CUDA_VISIBLE_DEVICES``) runs its workers on those, numbered as torch
numbers them for it: with ``CUDA_VISIBLE_DEVICES=1`` its ``cuda:0`` is the machine's GPU 1. Before session 26
each worker set ``CUDA_VISIBLE_DEVICES`` to its own index, and ran on the machine's GPU 0, another tenant's
maybe. The status says which GPU each device is; nvidia-smi says where the worker's process runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from swapserve.node.controller import Node, NodeConfig

from .harness import in_node

pytestmark = [pytest.mark.integration, pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader"], check=True,
                         capture_output=True, text=True).stdout
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def test_a_node_on_the_second_gpu_runs_its_worker_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the workers, spawned below, inherit it
    uuid_of = {index: uuid for index, uuid in _smi("gpu=index,uuid")}

    async def body(node: Node) -> None:
        (dev,) = node.snapshot().devices
        assert (dev.device, dev.gpu) == ("cuda:0", "1")
        pid = node.dispatch._workers[0].process.pid
        on = {int(p): uuid for p, uuid in _smi("compute-apps=pid,gpu_uuid")}
        assert on.get(pid) == uuid_of["1"], f"the worker (pid {pid}) is on {on.get(pid)}, not GPU 1 {uuid_of['1']}"

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cuda:0",), pool_bytes=64 << 20,
                                    workspace_bytes=64 << 20, host_store_bytes=128 << 20), body)
