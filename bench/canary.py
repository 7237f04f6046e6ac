"""How fast the machine ran a fixed piece of Python while a benchmark ran: a process of its own times the same
work every ``interval_s``.

A/Bs on one node keep meeting replays that are slower throughout. In the fifteenth session one replay was
+0.65 ms at the median for every request, and every part was slower, the client's and the gateway's too.
No CPU steal was recorded (``bench/steal.py``). The canary tells such a replay apart. If the machine slowed
down, the canary's work takes longer in that replay too. If the code did it, the canary's time stays put.
Its work is interpreted Python, which is what bounds the node's request path. It runs in its own process so
that no lock of the benchmark delays it. It uses about 1 % of one core.

    canary = Canary(); canary.start(); ...; canary.stop()  # {"median_ms", "p90_ms", "samples", "interval_s"}
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

WORK = 10_000
"""Iterations of the loop timed: ~1.2 ms of interpreted Python on the CI box."""


def work(n: int = WORK) -> float:
    """Seconds one run of the fixed work took."""
    t = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return time.perf_counter() - t


def _loop(conn: Connection, interval_s: float) -> None:
    """In the canary process: time :func:`work` every ``interval_s`` until told to stop; send the times."""
    times = []
    while not conn.poll(interval_s):
        times.append(work())
    conn.send(times)


class Canary:
    """:func:`work` timed every ``interval_s`` in a process of its own, from :meth:`start` to :meth:`stop`."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self._conn: Connection | None = None
        self._proc: mp.process.BaseProcess | None = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_loop, args=(theirs, self.interval_s), name="canary", daemon=True)
        self._proc.start()
        theirs.close()

    def stop(self) -> dict[str, float] | None:
        """The median and 90th percentile of the work's time (ms) since :meth:`start`; None if it never ran."""
        if self._conn is None or self._proc is None:
            return None
        self._conn.send(None)
        times = self._conn.recv() if self._conn.poll(30.0) else []
        self._proc.join(10.0)
        self._conn.close()
        self._conn = self._proc = None
        if not times:
            return None
        ms = sorted(t * 1e3 for t in times)
        return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
                "samples": len(ms), "interval_s": self.interval_s}
