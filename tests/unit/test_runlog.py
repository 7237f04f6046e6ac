"""The node's run log (:mod:`swapserve.node.runlog`): a bounded ring read from its newest end; and the controller's
stalls kept beside it."""

from __future__ import annotations

import asyncio
import gc
import logging

from swapserve.heap import watch_pauses
from swapserve.node.dispatch import Dispatcher
from swapserve.node.runlog import RunLog, RunRecord, Stall
from swapserve.scheduler import DeviceState, LinkProfile, NodeState, Scheduler


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


def test_it_keeps_the_last_stalls_and_answers_those_since_a_time() -> None:
    log = RunLog(stalls_kept=3)
    assert log.stalls() == []
    for t in (1.0, 2.0, 3.0, 4.0):
        log.add_stall(Stall(t - 0.002, t, "loop", 0.1))
    assert [x.ended for x in log.stalls()] == [2.0, 3.0, 4.0]
    assert [x.ended for x in log.stalls(3.0)] == [3.0, 4.0]


def _dispatcher(clock) -> Dispatcher:
    state = NodeState([DeviceState(0, 1 << 30)], {}, {}, LinkProfile((50.0,)))
    return Dispatcher(state, Scheduler(spin_ms=1000.0), [], None, {}, {}, None, clock, lambda k: None, 1)


def test_a_turn_of_the_polling_loop_that_held_it_a_millisecond_or_more_is_kept_as_a_stall() -> None:
    """The controller polls (``spin_ms``): from one poll to the next is one turn of its loop. A turn the clock
    says took 4 ms is kept, with when it began and ended; one of 0.2 ms is not."""
    now = [100.0]
    dispatch = _dispatcher(lambda: now[0])

    async def scenario() -> None:
        dispatch._keep_hot()
        await asyncio.sleep(0)
        now[0] += 0.004  # this turn's callbacks held the loop 4 ms
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        now[0] += 0.0002
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        dispatch.live = False  # the polling ends
        await asyncio.sleep(0)

    asyncio.run(scenario())
    (stall,) = dispatch.runs.stalls()
    assert stall[:3] == (100.0, 100.004, "loop")
    assert 0.0 <= stall.cpu_ms < 1000.0  # the thread's own CPU time meanwhile (the fake clock's 4 ms were not spent)


def test_a_collection_in_the_controller_is_kept_as_a_stall() -> None:
    """``heap.PauseLog.record`` tells the dispatcher of a collection as long as ``record_ms``: kept, ending now."""
    dispatch = _dispatcher(lambda: 200.0)
    pauses = watch_pauses(logging.getLogger("test.runlog"), "this process", min_ms=60_000.0)
    pauses.record, pauses.record_ms = dispatch.keep_pause, 0.0
    try:
        gc.collect(1)
    finally:
        gc.callbacks.remove(pauses)
    kept = [x for x in dispatch.runs.stalls() if x.what == "gc 1"]  # ours, and any the interpreter ran meanwhile
    assert kept, dispatch.runs.stalls()
    stall = kept[-1]
    assert stall.ended == 200.0 and 0.0 <= stall.ended - stall.begun < 1.0 and stall.cpu_ms >= 0.0
