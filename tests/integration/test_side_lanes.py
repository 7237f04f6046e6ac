"""More than one side lane per device (``serve --lanes 3``) over a real node: resident models' requests run
side by side, each in a lane of its own, and ``side_lanes`` limits how many of them new runs take."""

from __future__ import annotations

import pytest
import torch

from .harness import Server, assert_stopped_cleanly, deploy, infer_json, outputs_of, second_while_first_runs

pytestmark = pytest.mark.integration


def _two_at_once(s: Server, x: torch.Tensor, want: torch.Tensor) -> dict[str, dict]:
    """heavy-a's request, and once it runs, heavy-b's: the answers' parameters by function (each answer
    checked)."""
    params: dict[str, dict] = {}

    def infer(name: str) -> None:
        r = infer_json(s, name, {"x": x})
        assert r.status == 200, r.body
        torch.testing.assert_close(outputs_of(r.json())["y"], want)
        params[name] = r.json()["parameters"]

    second_while_first_runs(s, lambda: infer("heavy-a"), lambda: infer("heavy-b"))
    assert set(params) == {"heavy-a", "heavy-b"}, params
    return params


def test_resident_models_run_side_by_side_in_side_lanes(server_factory, functions, tmp_path):
    s = server_factory(extra=("--lanes", "3")).start()
    s.wait_ready()
    for name in ("heavy-a", "heavy-b"):
        assert deploy(s, functions.heavy.variant(tmp_path, name=name))["state"] == "READY"
    x = torch.randn(1, 1024)
    want = functions.heavy.expected(x)[0]
    for name in ("heavy-a", "heavy-b"):  # both on the device now
        torch.testing.assert_close(s.client().infer(name, {"x": x})["y"], want)
    params = _two_at_once(s, x, want)
    # The second arrived while the first ran (a tenth of a second or more): both in side lanes, one each,
    # keeping the first lane (the only one that swaps) free.
    assert sorted(p["lane"] for p in params.values()) == [1, 2], params
    assert not any(p["swapped"] for p in params.values()), params
    assert s.client().configure_scheduling(side_lanes=1)["side_lanes"] == 1
    params = _two_at_once(s, x, want)
    assert sorted(p["lane"] for p in params.values()) == [0, 1], params  # one side lane: the second in lane 0
    status = s.client().status()
    assert status["extra"]["exec_slowdown_copying"] == 1.0  # CPU workers: nothing measured, nothing assumed
    assert_stopped_cleanly(s, s.stop())
