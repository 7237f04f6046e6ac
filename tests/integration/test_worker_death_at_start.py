"""A worker that dies while the node starts (out of host memory, say, as the node loads its functions) fails the
start (``serve`` exits 1, saying why): a node is ready only with every device, and this one never would be. Before,
it said "ready" and answered every request with an error. A real Node in this process with a real CPU worker,
killed before the node's start ends."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from swapserve.errors import BackendError
from swapserve.node.controller import Node, NodeConfig

pytestmark = pytest.mark.integration


def test_a_worker_dead_before_the_start_ends_fails_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPSERVE_SHM_DIR", str(tmp_path / "shm"))
    profile = Node._profile_link

    async def killed_first(node: Node, *args):  # after the worker's hello, before the functions load
        (w,) = node._workers
        os.kill(w.process.pid, signal.SIGKILL)
        for _ in range(500):
            if w.dead:
                break
            await asyncio.sleep(0.01)
        assert w.dead
        return await profile(node, *args)

    monkeypatch.setattr(Node, "_profile_link", killed_first)

    async def main() -> None:
        node = Node(NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=64 << 20,
                               workspace_bytes=64 << 20, host_store_bytes=128 << 20))
        try:
            with pytest.raises(BackendError, match=r"worker 0 \(cpu\) died while the node started"):
                await node.start()
            assert not node.is_ready()
        finally:
            await node.stop(5.0)

    asyncio.run(main())
