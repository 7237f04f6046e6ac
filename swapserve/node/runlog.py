"""What the node's lanes ran lately: every run, piece of a swap and prefetch a worker finished, with its device,
lane, function and when its lane took it up and answered it on the node's clock, in a bounded ring read by
``GET /api/v1/runs``.

A request's answer says how its own run went (``queue_ms``, ``lane``, ``worker_ms``, ... in its parameters);
it does not say what else its lane ran meanwhile. Pieces of a swap and prefetches carry no request at all, so
in the trace's records a first lane copying pieces looked idle: session 30 read the BERT-large misses of its
A/B around such gaps, with "most likely" for what filled them. The log is what fills them.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

RUNS_KEPT = 65536
"""Runs the ring keeps: at 150 a second (two H200s at N = 800) the last seven minutes."""
RUNS_ANSWERED = 1000
"""The most recent runs an answer holds unless it asks for more: the whole ring took ~56 ms of the controller's
event loop to answer on the CI box (every request on the node waits meanwhile), a thousand under 1 ms."""


class RunRecord(NamedTuple):
    begun: float
    """When its lane took it up (the node's clock, s): its dispatch, or the end of the run it was queued behind."""
    ended: float
    """When its reply was taken up (s)."""
    device: str
    """As the node names it (``cuda:0``, ``cpu``)."""
    lane: int
    """The lane it ran in (a side lane's run the worker handed to the first lane: 0)."""
    function: str
    kind: str
    """``run``, ``piece`` (a piece of a swap) or ``prefetch`` (a model copied in ahead of its requests)."""
    requests: int
    source: str
    """Where the dispatch planned its model's bytes to come from (``resident``, ``host``, ``partial``, ``peer``)."""
    swapped: bool
    bytes_copied: int
    wall_ms: float
    """Its swap (if any) and execution, as the worker timed it."""
    expected_ms: float
    """What the scheduler expected of it."""


FIELDS = RunRecord._fields


class RunLog:
    def __init__(self, kept: int = RUNS_KEPT) -> None:
        self._runs: deque[RunRecord] = deque(maxlen=kept)

    def add(self, record: RunRecord) -> None:
        self._runs.append(record)

    def since(self, t: float | None = None, limit: int = RUNS_KEPT) -> list[RunRecord]:
        """The last ``limit`` runs kept that ended at ``t`` or later (any time for None), in the order they ended
        (the order they were added: each is added as its reply is handled, on the node's clock). Reads only
        what it returns."""
        out = []
        for r in reversed(self._runs):
            if len(out) >= limit or (t is not None and r.ended < t):
                break
            out.append(r)
        out.reverse()
        return out


__all__ = ["FIELDS", "RUNS_ANSWERED", "RUNS_KEPT", "RunLog", "RunRecord"]
