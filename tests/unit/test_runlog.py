"""The node's run log (:mod:`swapserve.node.runlog`): a bounded ring read from its newest end."""

from __future__ import annotations

from swapserve.node.runlog import RunLog, RunRecord


def _run(ended: float, kind: str = "run") -> RunRecord:
    return RunRecord(ended - 0.001, ended, "cuda:0", 0, "f", kind, 1, "host", True, 1 << 20, 1.0, 1.0)


def test_it_keeps_the_last_runs_and_answers_those_since_a_time_up_to_a_limit_in_the_order_they_ended() -> None:
    log = RunLog(kept=4)
    assert log.since() == []
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        log.add(_run(t))
    assert [r.ended for r in log.since()] == [3.0, 4.0, 5.0, 6.0]  # the ring's four
    assert [r.ended for r in log.since(4.0)] == [4.0, 5.0, 6.0]
    assert [r.ended for r in log.since(4.5, limit=1)] == [6.0]
    assert [r.ended for r in log.since(limit=2)] == [5.0, 6.0]
    assert log.since(7.0) == []
