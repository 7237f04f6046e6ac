"""A device's second lane bringing a model in itself while the first lane is busy (``--side-fetch``), over a
real node."""

from __future__ import annotations

import threading

import pytest
import torch

from .harness import assert_serves, assert_stopped_cleanly, deploy, metric, wait_busy

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fetch", [True, False])
def test_small_models_come_in_by_the_side_lane_while_the_first_lane_swaps(server_factory, functions, tmp_path,
                                                                          fetch):
    """A two-page pool: heavy, then two small functions deployed (heavy, the oldest, is evicted). Heavy's
    request swaps it in on the first lane and computes for a tenth of a second or more; meanwhile, requests
    for both small models, one of which heavy's swap evicted: with side fetches it comes in by the second
    lane instead of waiting for heavy. Every answer is its own model's."""
    flag = "--side-fetch" if fetch else "--no-side-fetch"
    s = server_factory(extra=("--pool", "64MiB", flag)).start()
    s.wait_ready()
    assert deploy(s, functions.heavy.variant(tmp_path))["state"] == "READY"
    for name in ("small-a", "small-b"):
        assert deploy(s, functions.mlp.variant(tmp_path, name=name))["state"] == "READY"
    before = s.request("GET", "/metrics").body.decode()
    x = torch.randn(1, 1024)
    heavy: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: heavy.append(s.client().infer("heavy", {"x": x})["y"]))
    t.start()
    wait_busy(s, "heavy's request")  # heavy's swap is under way
    smalls = [threading.Thread(target=assert_serves, args=(s, functions.mlp, i, name))
              for i, name in enumerate(("small-a", "small-b"))]
    for th in smalls:
        th.start()
    for th in (t, *smalls):
        th.join(60)
    torch.testing.assert_close(heavy[0], functions.heavy.expected(x)[0])
    after = s.request("GET", "/metrics").body.decode()
    fetched = metric(after, "swapserve_side_fetches_total", device="cpu") - metric(
        before, "swapserve_side_fetches_total", device="cpu")
    assert (fetched >= 1) if fetch else (fetched == 0), s.log()
    assert_stopped_cleanly(s, s.stop())
