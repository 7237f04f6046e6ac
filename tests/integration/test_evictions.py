"""Swaps that evict, over a real node: a pool of one page, two functions that cannot both stay."""

from __future__ import annotations

import pytest
import torch

from .harness import assert_stopped_cleanly, deploy, metric

pytestmark = pytest.mark.integration


def test_functions_that_do_not_fit_together_take_turns_and_answer_right(server_factory, functions, tmp_path):
    # One 32 MiB page: each 4 MiB model takes it whole, so every request for the other function evicts this one.
    # Each such swap carries eviction values (the other model is on the device), as changes from what the
    # worker holds (Dispatcher._values).
    s = server_factory(extra=("--pool", "32MiB")).start()
    s.wait_ready()
    for name in ("heavy", "heavy2"):
        assert deploy(s, functions.heavy.variant(tmp_path, name=name))["state"] == "READY"
    x = torch.randn(1, 1024)
    want = functions.heavy.expected(x)[0]
    before = s.request("GET", "/metrics").body.decode()
    for _ in range(3):
        for name in ("heavy", "heavy2"):
            torch.testing.assert_close(s.client().infer(name, {"x": x})["y"], want)
    after = s.request("GET", "/metrics").body.decode()
    evicted = metric(after, "swapserve_evictions_total", device="cpu") - metric(before, "swapserve_evictions_total",
                                                                               device="cpu")
    assert evicted >= 5, s.log()  # every request but perhaps the first found the other model in the page
    assert_stopped_cleanly(s, s.stop())
