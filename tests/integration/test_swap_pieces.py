"""A long swap in pieces (``--swap-piece-ms``): copies with no run, then the run, over a real node."""

from __future__ import annotations

import pytest
import torch

from .harness import assert_stopped_cleanly, deploy, metric

pytestmark = pytest.mark.integration


def test_a_long_swap_comes_in_pieces_and_answers_as_a_resident_run(server_factory, functions, tmp_path):
    # Nothing copied at deploy (--no-prepare); pieces of 0.02 ms: the 4 MiB model's copy is many of them.
    s = server_factory(extra=("--no-prepare", "--swap-piece-ms", "0.02")).start()
    s.wait_ready()
    assert deploy(s, functions.heavy.archive(tmp_path))["state"] == "READY"
    x = torch.randn(1, 1024)
    before = s.request("GET", "/metrics").body.decode()
    first = s.client().infer("heavy", {"x": x})["y"]
    after = s.request("GET", "/metrics").body.decode()
    torch.testing.assert_close(first, functions.heavy.expected(x)[0])

    def grew(name: str) -> float:
        return metric(after, name, device="cpu") - metric(before, name, device="cpu")

    assert grew("swapserve_swap_pieces_total") >= 1, s.log()
    assert grew("swapserve_swap_bytes_total") >= 4 * 2**20  # its 1024×1024 fp32 weight, all in
    again = s.client().infer("heavy", {"x": x})["y"]  # resident now
    assert torch.equal(again, first)
    # The node's run log has the pieces (no request of their own) and both runs, in the order they ended.
    log = s.client().runs()
    runs = [dict(zip(log["fields"], r)) for r in log["runs"] if r[log["fields"].index("function")] == "heavy"]
    kinds = [r["kind"] for r in runs]
    assert kinds.count("piece") >= 1 and kinds[-2:] == ["run", "run"] and set(kinds) == {"piece", "run"}, kinds
    assert runs[-1]["source"] == "resident" and not runs[-1]["swapped"] and not runs[-1]["bytes_copied"]
    assert sum(r["bytes_copied"] for r in runs[:-1]) >= 4 * 2**20, runs  # the pieces (and the first run, if any)
    assert all(r["begun"] <= r["ended"] <= log["now"] and r["device"] == "cpu" for r in runs)
    assert [r["ended"] for r in runs] == sorted(r["ended"] for r in runs)
    assert [r["requests"] for r in runs if r["kind"] == "run"] == [1, 1]
    assert s.client().runs(since=runs[-1]["ended"])["runs"][-1][log["fields"].index("ended")] == runs[-1]["ended"]
    # Beside them, the controller's stalls (turns of its loop timed only while it polls: none asked of it here).
    assert log["stall_fields"] == ["begun", "ended", "what", "cpu_ms"]
    assert all(b <= e <= log["now"] and (w == "loop" or w.startswith("gc ")) and cpu >= 0
               for b, e, w, cpu in log["stalls"]), log
    assert_stopped_cleanly(s, s.stop())
