"""Peer copies over a real node of two CPU workers (``cpu:0,cpu:1``), in this process: at start every worker maps
the other's pages; a run on one device then copies its model from the device that lent it, and answers exactly
what a resident run answers. CPU "devices" copy from each other no faster than from host, where the scheduler
rightly never picks a peer: the test sets the link's figures as a machine would measure them whose devices copy
from each other far faster than from host (NVLink against a slow host link), so that the decision goes that way
and the mechanism underneath is what is tested."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from swapserve.errors import InvalidInputError
from swapserve.node import workers as wk
from swapserve.node.controller import Node, NodeConfig
from swapserve.node.messages import Evict

from .harness import Functions, in_node

pytestmark = pytest.mark.integration

FAST_PEERS = {"h2d_GBps": (0.001, 0.001), "d2d_GBps": 10_000.0}
"""Heavy's 4 MiB take 4 s from host, well under a millisecond from a peer, and it computes for about 0.1 s."""


def _peer_copies(node: Node, devices: tuple[str, ...]) -> list[float]:
    get = node.metrics.registry.get_sample_value
    return [get("swapserve_peer_copies_total", {"device": d}) or 0.0 for d in devices]


def _one_per_batch(functions: Functions, root: Path) -> Path:
    """Heavy with max_batch 1: requests queued behind its run are a queue longer than one batch, so they
    spread to another device."""
    dest = root / f"heavy-{uuid.uuid4().hex[:6]}"
    shutil.copytree(functions.heavy.bundle, dest)
    raw = yaml.safe_load((dest / "function.yaml").read_text())
    raw["max_batch"] = 1
    (dest / "function.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


async def _borrows(node: Node, devices: tuple[str, ...], lender: int, borrower: int,
                   x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Heavy (resident on ``lender``) evicted from ``borrower``; three requests at once: one runs there, and one of the two queued behind it
    goes to ``borrower``, copied from the lender, with the answer of a resident run. Returns that answer and
    the peer copies counted after."""
    key = node._models["heavy"].key
    reply = await wk.call(node._workers[borrower], Evict(wk.next_id(), key))  # now on the lender only
    assert reply.ok, reply.error
    node.dispatch.refresh_residency()
    first = await node.infer("heavy", {"x": x})  # a resident run, on the lender
    assert first.device == devices[lender] and not first.swapped
    before = _peer_copies(node, devices)

    # Three at once: one runs on the lender; the two behind it are a queue longer than a batch, so one
    # goes to the other device, copied from the lender, while the lender runs.
    results = await asyncio.gather(*(node.infer("heavy", {"x": x}) for _ in range(3)))
    (want,) = first.outputs.values()
    for r in results:
        (got,) = r.outputs.values()
        assert torch.equal(got, want), r.device  # bit for bit: the same bytes, the same program
    on_borrower = [r for r in results if r.device == devices[borrower]]
    assert on_borrower and on_borrower[0].swapped, [(r.device, r.swapped) for r in results]
    after = _peer_copies(node, devices)
    assert after[borrower] - before[borrower] >= 1 and after[lender] == before[lender], (before, after)
    return want, after


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.parametrize("kind", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_a_run_copies_its_model_from_the_device_that_lent_it_and_answers_as_a_resident_run(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """On two CPU workers here, and on two GPUs (NVLink where they have it) on the lent machine."""
    devices = (f"{kind}:0", f"{kind}:1")

    async def body(node: Node) -> None:
        measured = node.state.link.d2d_GBps
        assert measured is not None and measured > 0  # the workers mapped each other's pages at start
        node.state.link = replace(node.state.link, **FAST_PEERS)
        await node.deploy(_one_per_batch(functions, tmp_path))  # prepared on both: on both, graphs captured
        key = node._models["heavy"].key
        lender = 0
        x = torch.randn(1, 1024)
        want, after = await _borrows(node, devices, lender, 1, x)

        # Every loan ended with its run: the lender's copy can go.
        reply = await wk.call(node._workers[lender], Evict(wk.next_id(), key))
        assert reply.ok, reply.error

        # With peer copies off, the same spread swaps from host.
        await node.configure_scheduling({"peer_copies": False})
        await node.infer("heavy", {"x": x})
        results = await asyncio.gather(*(node.infer("heavy", {"x": x}) for _ in range(3)))
        for r in results:
            assert torch.equal(next(iter(r.outputs.values())), want)
        assert _peer_copies(node, devices) == after

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=devices, pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20, lanes=1,
                                    peer_copies=True, queue_ahead=False,
                                    swap_piece_ms=0), body)


@pytest.mark.gpu
@TWO_GPUS
def test_a_worker_started_again_and_the_others_copy_from_each_other_both_ways(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On two GPUs, a killed worker of a node whose devices map each other's pages: the other unmaps its pages,
    a new one starts, and each then maps the other's: runs copy from the survivor to the new one and back, and
    answer as before. (On CPU workers the next test covers it, with two of three killed.)"""
    devices = ("cuda:0", "cuda:1")

    async def body(node: Node) -> None:
        node.state.link = replace(node.state.link, **FAST_PEERS)
        await node.deploy(_one_per_batch(functions, tmp_path))
        x = torch.randn(1, 1024)
        want, _ = await _borrows(node, devices, 0, 1, x)
        dead = node._workers[1]
        os.kill(dead.process.pid, signal.SIGKILL)
        while not dead.dead:
            await asyncio.sleep(0.01)
        for _ in range(900):
            if node.snapshot().devices[1].serving:
                break
            await asyncio.sleep(0.1)
        assert node.snapshot().devices[1].serving and node._workers[1] is not dead, "not started again"
        for lender, borrower in ((0, 1), (1, 0)):
            got, _ = await _borrows(node, devices, lender, borrower, x)
            assert torch.equal(got, want), (lender, borrower)

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=devices, pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20, lanes=1,
                                    peer_copies=True, queue_ahead=False, swap_piece_ms=0), body)


def test_two_workers_killed_at_once_start_again_and_copy_from_each_other(
        functions: Functions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two of three CPU workers killed together: the survivor unmaps their pages, they start again side by
    side, and then every pair copies from each other both ways — the two new ones, and the survivor and a new
    one — answering as before (the third device taken out of the scheduler's view for each check, so that the
    run behind goes to the borrower)."""
    devices = ("cpu:0", "cpu:1", "cpu:2")

    async def body(node: Node) -> None:
        node.state.link = replace(node.state.link, **FAST_PEERS)
        await node.deploy(_one_per_batch(functions, tmp_path))
        x = torch.randn(1, 1024)
        want = next(iter((await node.infer("heavy", {"x": x})).outputs.values()))
        dead = [node._workers[1], node._workers[2]]
        for w in dead:
            os.kill(w.process.pid, signal.SIGKILL)
        while not all(w.dead for w in dead):
            await asyncio.sleep(0.01)
        for _ in range(1800):
            if all(d.serving for d in node.snapshot().devices):
                break
            await asyncio.sleep(0.1)
        assert all(d.serving for d in node.snapshot().devices), "not both started again"
        assert node.metrics.registry.get_sample_value("swapserve_worker_restarts_total", {"device": "cpu:2"}) == 1
        for lender, borrower, aside in ((1, 2, 0), (2, 1, 0), (0, 1, 2), (1, 0, 2)):
            node.state.devices[aside].out = True
            got, _ = await _borrows(node, devices, lender, borrower, x)
            node.state.devices[aside].out = False
            assert torch.equal(got, want), (lender, borrower)

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=devices, pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20, lanes=1,
                                    peer_copies=True, queue_ahead=False, swap_piece_ms=0), body)


def test_one_device_has_no_peers_and_refuses_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node) -> None:
        assert node.state.link.d2d_GBps is None
        with pytest.raises(InvalidInputError, match="two or more devices"):
            await node.configure_scheduling({"peer_copies": True})

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=64 << 20,
                                    workspace_bytes=64 << 20, host_store_bytes=128 << 20), body)
