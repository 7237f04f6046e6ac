"""A request's outputs written where its OutputSink says (an HTTP front's arena, a sandbox's), straight out of the
worker's IO slab: through a real Node in this process with a real CPU worker, for outputs copied on the event
loop (mlp) and on the copy thread (wide, over 1 MiB). A request whose caller gives up after its outputs were
placed gives the memory back (``discard``) and is never answered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from swapserve.node.controller import Node, NodeConfig

from .harness import Function, Functions, in_node

pytestmark = pytest.mark.integration


class Sink:
    """Gives fresh memory for every output and remembers it; optionally cancels its own request when asked."""

    def __init__(self, cancel: asyncio.Task[Any] | None = None) -> None:
        self.given: dict[str, torch.Tensor] = {}
        self.discarded = 0
        self.cancel = cancel

    def place(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        self.given[name] = torch.empty_like(like)
        if self.cancel is not None:
            self.cancel.cancel()  # the caller gives up just as its outputs are being written
        return self.given[name]

    def discard(self) -> None:
        self.discarded += 1


def test_outputs_land_where_the_sink_says_and_a_cancelled_request_gives_them_back(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node) -> None:
        for fn in (functions.mlp, functions.wide):
            await node.deploy(fn.bundle)
        for fn in (functions.mlp, functions.wide):
            x = torch.randn(2, 16)
            (want,) = fn.expected(x)
            sink = Sink()
            result = await node.infer(fn.name, {"x": x}, sink=sink)
            (got,) = result.outputs.values()
            assert got.data_ptr() == sink.given["y"].data_ptr(), fn.name  # written there, not copied after
            torch.testing.assert_close(got, want)
            assert sink.discarded == 0
            await cancelled_after_placing(node, fn)

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20), body)


async def cancelled_after_placing(node: Node, fn: Function) -> None:
    sink = Sink()
    task = asyncio.ensure_future(node.infer(fn.name, {"x": torch.randn(1, 16)}, sink=sink))
    sink.cancel = task
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):  # outputs copied on a thread are given back once that copy ends
        if sink.discarded:
            break
        await asyncio.sleep(0.01)
    assert sink.given and sink.discarded == 1, fn.name
