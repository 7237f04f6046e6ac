"""A node starting on a home with registered functions serves each as soon as it is loaded: an N = 800 node on
two H200s took 270-290 s to load its functions, and every request got 503 (or 404, for a function not loaded
yet) until the last one was. Meanwhile the others are listed as LOADING, answer 503 saying so, and refuse
(409) what their load's end would undo: a deploy, delete, unload or load of that name. The node is ready once
all are loaded. Through a real Node in this process with a real CPU worker, one function's load held back."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from swapserve.errors import ConflictError, UnavailableError
from swapserve.node.api import FunctionState
from swapserve.node.controller import Node, NodeConfig

from .harness import Functions, shm_root

pytestmark = pytest.mark.integration


def test_loaded_functions_serve_while_the_node_loads_the_others(functions: Functions, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    shm = shm_root() / f"swapserve-it-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("SWAPSERVE_SHM_DIR", str(shm))
    cfg = NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=128 << 20, workspace_bytes=128 << 20,
                     host_store_bytes=256 << 20)
    x, ids = torch.randn(1, 8), torch.tensor([[1, 2, 3]])
    held = asyncio.Event()

    async def main() -> None:
        first = Node(cfg)
        await first.start()
        for fn in (functions.mlp, functions.pair):
            await first.deploy(fn.bundle)
        await first.stop(5.0)

        node = Node(cfg)
        bring_up = node._bring_up

        async def holding_pair(spec: Any, *args: Any) -> None:
            if spec.name == "pair":
                await held.wait()
            await bring_up(spec, *args)

        monkeypatch.setattr(node, "_bring_up", holding_pair)
        starting = asyncio.ensure_future(node.start())
        try:
            while node._functions.get("mlp") is None or node.get_function("mlp").state is not FunctionState.READY:
                assert not starting.done(), starting
                await asyncio.sleep(0.01)
            assert not node.is_ready()
            y = (await node.infer("mlp", {"x": torch.randn(1, 16)})).outputs["y"]
            assert y.shape == (1, 4)
            pair = node.get_function("pair")
            assert (pair.state, pair.reason) == (FunctionState.LOADING, "loading at the node's start")
            with pytest.raises(UnavailableError, match="'pair' is LOADING") as refused:
                await node.infer("pair", {"x": x, "ids": ids})
            assert refused.value.retry_after == 5.0  # the gateway's Retry-After
            for what, call in (("deploy", node.deploy(functions.pair.bundle)), ("delete", node.delete("pair")),
                               ("unload", node.unload("pair")), ("load", node.load("pair"))):
                with pytest.raises(ConflictError, match=f"'pair' is being loaded .*; {what} it once it is READY"):
                    await call
            held.set()
            await starting
            assert node.is_ready() and node.get_function("pair").state is FunctionState.READY
            got = (await node.infer("pair", {"x": x, "ids": ids})).outputs
            for name, want in zip(("y", "z"), functions.pair.expected(x, ids)):
                assert torch.equal(got[name], want)
        finally:
            held.set()
            await asyncio.gather(starting, return_exceptions=True)
            await node.stop(5.0)

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
