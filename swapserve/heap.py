"""The Python heap of a node's long-lived processes: kept out of the cyclic collector's way, and its pauses logged.

A worker holds every model of the node: each model's program, its weights' tensor views and its manifest are
~1,700 Python objects (ResNet-50), so a worker of 800 functions holds over a million. CPython's collector scans
them all in a full collection, which comes once the objects that survived the last one grow by a quarter, and
holds the process, every lane's run with it, for as long as the scan takes: on two H200s the workers' full
collections grew to 815 ms while they loaded 800 functions. :func:`settle` collects once and moves what is alive
out of the collector's reach (``gc.freeze``); later collections scan only what came after. A worker settles after
each model it adds (``AddModel``: the first one also brings torch.export's deserializer, ~1,300 modules and
180,000 objects), when a collection scans little more than that model; the controller settles once its start is
done. A model removed after that keeps its few objects in reference cycles (14 a ResNet-50) until the process
ends.

From its first :func:`settle` on, a process logs every collection that holds it for :data:`PAUSE_LOG_MS` or more
(:func:`watch_pauses`; not before: loading collects often, and those pauses delay no request).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PAUSE_LOG_MS = 10.0
"""A collection at least this long is logged (a warning: it delayed every request in the process)."""


@dataclass(frozen=True)
class Frozen:
    objects: int
    """Objects moved out of the collector's reach (all of them frozen so far)."""
    collect_ms: float
    """The collection before the freeze (of everything not frozen yet)."""


def freeze() -> Frozen:
    """Collect every generation, then freeze what is alive."""
    t0 = time.perf_counter()
    gc.collect()
    collect_ms = (time.perf_counter() - t0) * 1e3
    gc.freeze()
    return Frozen(gc.get_freeze_count(), collect_ms)


class PauseLog:
    """The ``gc.callbacks`` entry of :func:`watch_pauses`."""

    def __init__(self, logger: logging.Logger, what: str, min_ms: float):
        self.logger = logger
        self.what = what
        self.min_ms = min_ms
        self._began = self._cpu = 0.0
        self.record: Callable[[float, float, int], None] | None = None
        """Told of every collection that took ``record_ms`` or more: its ms, the thread's CPU ms meanwhile and its
        generation (the controller keeps them as stalls, :mod:`swapserve.node.runlog`)."""
        self.record_ms = math.inf

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            if self.record is not None:
                self._cpu = time.thread_time()
            return
        ms = (time.perf_counter() - self._began) * 1e3
        if ms >= self.record_ms and self.record is not None:
            self.record(ms, (time.thread_time() - self._cpu) * 1e3, info.get("generation", -1))
        if ms >= self.min_ms:
            self.logger.warning("%s: a garbage collection (generation %d, %d collected) held the process for "
                                "%.0f ms", self.what, info.get("generation", -1), info.get("collected", 0), ms)


def watch_pauses(logger: logging.Logger, what: str, min_ms: float = PAUSE_LOG_MS) -> PauseLog:
    """Log, through ``logger``, every collection in this process that takes ``min_ms`` or more; ``what`` names
    the process in the line. Returns the callback (``gc.callbacks.remove`` takes it out)."""
    pauses = PauseLog(logger, what, min_ms)
    gc.callbacks.append(pauses)
    return pauses


def settle(logger: logging.Logger, what: str) -> Frozen:
    """The process has loaded what it serves: :func:`freeze`, then watch the collector's pauses (once per
    process, however often it settles)."""
    frozen = freeze()
    if pauses() is None:
        watch_pauses(logger, what)
    return frozen


def pauses() -> PauseLog | None:
    """This process's :class:`PauseLog`, once it has settled."""
    return next((c for c in gc.callbacks if isinstance(c, PauseLog)), None)


__all__ = ["Frozen", "PAUSE_LOG_MS", "PauseLog", "freeze", "pauses", "settle", "watch_pauses"]
