"""The node's CPUs: how many cores this process may keep busy.

The CPUs it may run on (its affinity) can be many more than it may use: a container limited to two CPUs on a
64-core machine sees all 64 but gets two cores' worth of time (its cgroup's CPU quota). A controller that
polls (``spin_ms``) keeps one of them busy while requests flow, so the default counts what is usable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on, capped by its cgroup's CPU quota where one is set (cgroup v2
    ``cpu.max``, or v1 ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def _quota(root: Path) -> float | None:
    """The cgroup's CPU quota in cores, or None where there is none (or it cannot be read)."""
    try:
        text = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 for none
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


__all__ = ["usable_cores"]
