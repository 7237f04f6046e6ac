"""Placing a queued run's pages while the run before it executes (``place_ahead``), over a real node."""

from __future__ import annotations

import pytest
import torch

from .harness import Server, assert_stopped_cleanly, deploy, metric, second_while_first_runs

pytestmark = pytest.mark.integration


def _b_behind_a(s: Server, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """heavy-a's request, and once it runs, heavy-b's (queued behind it in the first lane): the answers."""
    out: dict[str, torch.Tensor] = {}

    def infer(name: str) -> None:
        out[name] = s.client().infer(name, {"x": x})["y"]

    second_while_first_runs(s, lambda: infer("heavy-a"), lambda: infer("heavy-b"))
    return out


def test_a_run_queued_behind_another_has_its_pages_placed_meanwhile(server_factory, functions, tmp_path):
    """A one-page pool: heavy-a and heavy-b take turns on it, so each request swaps. heavy-b's request, sent
    while heavy-a's computes (a tenth of a second or more), goes behind it in the first lane; with
    ``place_ahead`` its page is placed (heavy-a's, once that run lets it go) before its own run starts."""
    s = server_factory(extra=("--pool", "32MiB", "--lanes", "1")).start()
    s.wait_ready()
    for name in ("heavy-a", "heavy-b"):
        assert deploy(s, functions.heavy.variant(tmp_path, name=name, slo_ms=60000))["state"] == "READY"
    x = torch.randn(1, 1024)
    want = functions.heavy.expected(x)[0]

    def placed() -> float:
        return metric(s.request("GET", "/metrics").body.decode(), "swapserve_placed_ahead_total", device="cpu")

    for on in (False, True):
        assert s.client().configure_scheduling(place_ahead=on)["place_ahead"] is on
        before = placed()
        out = _b_behind_a(s, x)
        for name in ("heavy-a", "heavy-b"):
            torch.testing.assert_close(out[name], want)
        assert placed() - before == (1 if on else 0), s.log()
    assert_stopped_cleanly(s, s.stop())
