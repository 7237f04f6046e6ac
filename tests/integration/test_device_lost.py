"""A run that faults, through a real Node in this process with a real worker: a model that indexes a table of its
own with its input (no ``nn.Embedding``, so the build finds no bound to check its values against) given an index
out of range. On a CPU that is the run's own error: the request gets it and the worker goes on serving. On a GPU
the indexing kernel faults (a device-side assert) and the worker's CUDA context fails every call from then on: the
worker exits (``EXIT_DEVICE_LOST``), the request gets the device's error, and the node reports itself not ready
and refuses new work, where before it went on failing every later run on that device; then the node starts the
worker again (a fresh context), adds the model there, and serves it as before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from swapserve.errors import SwapserveError, UnavailableError
from swapserve.functions.build import build_bundle
from swapserve.node.controller import Node, NodeConfig
from swapserve.node.worker import EXIT_DEVICE_LOST

from .harness import in_node, load_local_model, spec_dict, write_function_dir

pytestmark = pytest.mark.integration

LOOKUP_PY = '''
import torch
from torch import nn


class Lookup(nn.Module):
    """Rows of its own table by the input's indices."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, ids):
        return self.table[ids].sum(1)


def build():
    torch.manual_seed(5)
    return Lookup().eval(), (torch.tensor([[1, 2, 3]]),)
'''
LOOKUP_SPEC = spec_dict("lookup", [{"name": "ids", "datatype": "INT64", "shape": [-1, 3]}],
                        [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}], max_batch=4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_a_run_that_faults_its_device_takes_the_device_out_of_service(tmp_path: Path, device: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_function_dir(tmp_path / "src", LOOKUP_SPEC, LOOKUP_PY)
    bundle = tmp_path / "bundle"
    build_bundle(src, bundle, progress=lambda line: None)
    model = load_local_model(src)
    good = torch.tensor([[1, 4, 9]])

    async def served(node: Node) -> None:
        result = await node.infer("lookup", {"ids": good})
        with torch.no_grad():
            torch.testing.assert_close(result.outputs["y"], model(good), rtol=1e-4, atol=1e-4)

    async def body(node: Node) -> None:
        await node.deploy(bundle)
        await served(node)
        worker = node.dispatch._workers[0]
        with pytest.raises(SwapserveError) as failed:
            await node.infer("lookup", {"ids": torch.tensor([[1, 4, 1000]])})
        assert failed.value.http_status == 500
        if device == "cpu":
            assert "out of bounds" in str(failed.value), failed.value
            await served(node)
            assert node.is_ready() and not worker.dead
            return
        for _ in range(200):  # the worker answers, then exits; the controller sees its pipe close
            if worker.dead:
                break
            await asyncio.sleep(0.05)
        assert worker.dead, "the worker went on after its device failed"
        # Its pipe closed as it exited; starting its successor (a process, a CUDA context) takes seconds.
        assert not node.is_ready()
        with pytest.raises(UnavailableError):
            await node.infer("lookup", {"ids": good})
        for _ in range(600):
            if node.is_ready():
                break
            await asyncio.sleep(0.1)
        assert node.is_ready() and node.dispatch._workers[0] is not worker, "the worker was not started again"
        await served(node)
        # The faulted context's teardown in its exit may outlast the successor's start: it outlasted 5 s in
        # three of session 25's four runs on H200s, and 60 s once in session 26's. It does not hold the device
        # back (served above); its exit code says why it left.
        t0 = time.monotonic()
        await asyncio.to_thread(worker.process.join, 240)
        assert worker.process.exitcode == EXIT_DEVICE_LOST, (
            f"exit code {worker.process.exitcode} {time.monotonic() - t0:.0f} s after its successor served")

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=(device,), pool_bytes=64 << 20,
                                    workspace_bytes=64 << 20, host_store_bytes=128 << 20), body)
