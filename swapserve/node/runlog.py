"""What the node's lanes ran lately: every run, piece of a swap and prefetch a worker finished, with its device,
lane, function and when its lane took it up and answered it on the node's clock, in a bounded ring read by
``GET /api/v1/runs``.

Beside the runs it keeps the controller's stalls: turns of its event loop, and collections in its process, that
held it :data:`STALL_MS` or longer. Every request and every worker reply waits those out, and the records of a
replay show only their effect: in session 31's replay at N = 800 on two H200s, the controller read four workers'
replies 1.7–4.2 ms late around 4.53 s, and what held it was not recorded.

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
STALLS_KEPT = 4096
"""Stalls the ring keeps."""
CPU_SAMPLE_MS = 0.25
"""How often, at most, the polling controller reads its thread's CPU time (a system call, ~0.5 µs)."""
STALL_MS = 1.0
"""A turn of the controller's event loop, or a collection, this long or longer is kept as a stall: while the node
serves, a turn (a request's handling, a decision, a reply taken up) takes 0.05–0.5 ms on an H200 machine."""


class Stall(NamedTuple):
    begun: float
    """The node's clock (s)."""
    ended: float
    what: str
    """``loop``: one turn of the controller's event loop, all the callbacks it ran (measured while the controller
    polls, with runs in flight: ``serve --spin-ms``); ``gc N``: a collection of generation N in its process (a
    collection within a turn shows in both)."""
    cpu_ms: float
    """The controller thread's CPU time meanwhile (a turn's: from the last sample, at most
    :data:`CPU_SAMPLE_MS` before it began). Near the stall's length: its own work held it; far below: the process
    was not running (another took its core: on the 2-core CI box every turn while a worker ran a model on CPU
    stalled ~4 ms so, with little CPU of its own) or waited in a call."""


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
STALL_FIELDS = Stall._fields


class RunLog:
    def __init__(self, kept: int = RUNS_KEPT, stalls_kept: int = STALLS_KEPT) -> None:
        self._runs: deque[RunRecord] = deque(maxlen=kept)
        self._stalls: deque[Stall] = deque(maxlen=stalls_kept)

    def add(self, record: RunRecord) -> None:
        self._runs.append(record)

    def add_stall(self, stall: Stall) -> None:
        self._stalls.append(stall)

    def stalls(self, t: float | None = None) -> list[Stall]:
        """The stalls kept that ended at ``t`` or later (all for None), in the order they were added."""
        return [x for x in self._stalls if t is None or x.ended >= t]

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


__all__ = ["CPU_SAMPLE_MS", "FIELDS", "RUNS_ANSWERED", "RUNS_KEPT", "STALLS_KEPT", "STALL_FIELDS", "STALL_MS",
           "RunLog", "RunRecord", "Stall"]
