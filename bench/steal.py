"""CPU time the hypervisor took from this machine while a benchmark ran ("steal", as ``/proc/stat`` counts it).

The lent GPU machines are virtual machines. In the twelfth session two replays of one trace on one node scored
0.657 and 0.862: in the first, for its last ten seconds, every part of the node was slower at once (dispatch
1-4 ms instead of 0.3, a swapped ResNet-50's run 8.7 ms instead of 2.5) under the same load. Whether the host
took the machine's CPUs meanwhile is what this records, so that such a replay can be told from a slower code:
the share of all CPU time stolen over the measured window, and in its worst window of ``interval_s``.

    meter = StealMeter(); meter.start(); ...; meter.stop()  # {"fraction", "max_window", "windows", "window_s"}
"""

from __future__ import annotations

import threading
from pathlib import Path

STAT = Path("/proc/stat")


def read(stat: Path = STAT) -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot, or None where there is no such count (no /proc/stat, or a
    kernel whose cpu line has no steal field)."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is in user and nice already.
    counts = [int(x) for x in first[1:9]]
    return counts[7], sum(counts)


class StealMeter:
    """Samples :func:`read` every ``interval_s`` on a thread, from :meth:`start` to :meth:`stop`."""

    def __init__(self, interval_s: float = 1.0, stat: Path = STAT):
        self.interval_s = interval_s
        self.stat = stat
        self._samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        first = read(self.stat)
        if first is None:
            return
        self._samples = [first]
        self._thread = threading.Thread(target=self._sample, name="steal-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            if (s := read(self.stat)) is not None:
                self._samples.append(s)

    def stop(self) -> dict[str, float] | None:
        """The share of CPU time stolen between start and now, and in the worst window between two samples
        (None where the machine does not count steal)."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        if (last := read(self.stat)) is not None:
            self._samples.append(last)
        (s0, t0), (s1, t1) = self._samples[0], self._samples[-1]
        windows = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(self._samples, self._samples[1:]) if b[1] > a[1]]
        return {"fraction": (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0, "max_window": max(windows, default=0.0),
                "windows": len(windows), "window_s": self.interval_s}
