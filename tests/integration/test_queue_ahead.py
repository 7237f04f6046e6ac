"""A device's first lane with a run queued behind the one it runs (``--queue-ahead``), over a real node."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .harness import assert_stopped_cleanly, deploy, metric

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("ahead", [True, False, "within"])
def test_swaps_queued_behind_a_run_answer_right(server_factory, functions, tmp_path, ahead):
    """Two compute-bound models that cannot both stay on the device (a one-page pool): requests for both at
    once, so that one swap is sent while the other runs. Every answer is its own model's on its own input (the
    queued run's inputs and outputs use a slab region of their own). A resident run in the side lane pins the
    only page the other model's swap needs: the swap waits for it (it failed with 503 before). "within": queued
    ahead only within 1 ms of the run's expected end (the controller wakes for it; serve's flag). Side fetches
    off: where the worker's copy probe measured the host fast enough, the side lane would fetch the second model
    itself rather than queue it behind the first (whose page it then waits for), and nothing would queue ahead."""
    flags = {True: ("--queue-ahead",), False: ("--no-queue-ahead",),
             "within": ("--queue-ahead", "--queue-ahead-within-ms", "1")}[ahead]
    s = server_factory(extra=("--no-prepare", "--pool", "32MiB", "--no-side-fetch", *flags)).start()
    s.wait_ready()
    assert s.client().scheduling()["queue_ahead_within_ms"] == (1.0 if ahead == "within" else None)
    for name in ("heavy-a", "heavy-b"):
        assert deploy(s, functions.heavy.variant(tmp_path, name=name))["state"] == "READY"
    xs = [torch.randn(1, 1024) for _ in range(6)]
    names = ["heavy-a", "heavy-b"] * 3
    before = s.request("GET", "/metrics").body.decode()
    with ThreadPoolExecutor(len(xs)) as pool:
        outs = list(pool.map(lambda nx: s.client().infer(nx[0], {"x": nx[1]})["y"], zip(names, xs)))
    after = s.request("GET", "/metrics").body.decode()
    for x, y in zip(xs, outs):
        torch.testing.assert_close(y, functions.heavy.expected(x)[0])
    queued = metric(after, "swapserve_queued_ahead_total", device="cpu") - metric(
        before, "swapserve_queued_ahead_total", device="cpu")
    if ahead is True:
        assert queued >= 1, s.log()
    elif ahead is False:
        assert queued == 0, s.log()
    assert_stopped_cleanly(s, s.stop())
