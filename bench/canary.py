"""How fast the machine ran a fixed piece of Python while a benchmark ran: a process of its own times the same
work every ``interval_s``.

A/Bs on one node keep meeting replays that are slower throughout. In the fifteenth session one replay was
+0.65 ms at the median for every request, and every part was slower, the client's and the gateway's too.
No CPU steal was recorded (``bench/steal.py``). The canary tells such a replay apart. If the machine slowed
down, the canary's work takes longer in that replay too. If the code did it, the canary's time stays put.
Its work is interpreted Python, which is what bounds the node's request path. It runs in its own process so
that no lock of the benchmark delays it. It uses about 1 % of one core.

Start it before what it watches, and :meth:`Canary.mark` the moment the measurement begins: the process is
this file run by the interpreter (the standard library only), yet starting it still takes tens of milliseconds
of a core. Started with multiprocessing's ``spawn``, as it first was, it re-imported the benchmark's own
module (numpy, swapserve) at the start of every trace point, and the requests of the first second were
disturbed 2–10× as often as the rest (2026-11-29, the seventeenth session).

    canary = Canary(); canary.start(); ...; canary.mark(); ...; canary.stop()
    # {"median_ms", "p90_ms", "samples", "interval_s"}
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = 10_000
"""Iterations of the loop timed: ~1.2 ms of interpreted Python on the CI box."""


def work(n: int = WORK) -> float:
    """Seconds one run of the fixed work took."""
    t = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return time.perf_counter() - t


def _loop(interval_s: float) -> None:
    """In the canary process: time :func:`work` every ``interval_s`` until stdin says ``stop`` (``mark``: forget
    the times so far); then write the times (seconds) to stdout as one JSON list."""
    times: list[float] = []
    fd = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], interval_s)
        if not ready:
            times.append(work())
            continue
        words = os.read(fd, 4096).split()  # unbuffered: a "mark" and a "stop" that came together are both seen
        for word in words:
            if word == b"mark":
                times.clear()
        if not words or b"stop" in words:  # told to, or the benchmark went away (end of input)
            break
    sys.stdout.write(json.dumps(times) + "\n")
    sys.stdout.flush()


class Canary:
    """:func:`work` timed every ``interval_s`` in a process of its own, from :meth:`start` (or the last
    :meth:`mark`) to :meth:`stop`."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(self.interval_s)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def mark(self) -> None:
        """The measurement begins now: only the times from here on count."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.write("mark\n")
            self._proc.stdin.flush()

    def stop(self) -> dict[str, float] | None:
        """The median and 90th percentile of the work's time (ms) since :meth:`start` or the last :meth:`mark`;
        None if it never ran."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        try:
            out, _ = proc.communicate("stop\n", timeout=30.0)
            times = json.loads(out) if out.strip() else []
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            times = []
        if not times:
            return None
        ms = sorted(t * 1e3 for t in times)
        return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
                "samples": len(ms), "interval_s": self.interval_s}


if __name__ == "__main__":
    _loop(float(sys.argv[1]))
