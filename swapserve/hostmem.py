"""The node's host memory: how much its host store may take on this machine, and how its controller allocates.

Every model stays in page-locked host memory, in files under the node's shared-memory directory
(``SWAPSERVE_SHM_DIR``, /dev/shm by default): a store larger than that directory's free space fails its loads,
and one that leaves the node's own processes too little of the machine's memory gets a worker killed by the
kernel (on a 125 GiB machine, a 124 GB store lost its only worker loading its 481st function, and the node then
answered every request with an error).
"""

from __future__ import annotations

import ctypes
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from swapserve.config import GiB, MiB

NODE_RESERVE_BYTES = 2 * GiB
"""Host memory the controller needs beside the host store (its interpreter, torch, request buffers)."""
GPU_WORKER_RESERVE_BYTES = 4 * GiB
"""Host memory each GPU's worker needs beside the host store (its CUDA context and libraries, captured graphs)."""
CPU_WORKER_RESERVE_BYTES = 1 * GiB
"""Host memory a CPU worker needs beside the host store (its interpreter, torch, its models' working memory)."""


def reserve_bytes(devices: Sequence[str]) -> int:
    """Host memory a node of these devices' workers needs beside its host store."""
    return NODE_RESERVE_BYTES + sum(GPU_WORKER_RESERVE_BYTES if d.startswith("cuda") else CPU_WORKER_RESERVE_BYTES
                                    for d in devices)


def available_memory() -> int | None:
    """The machine's available memory (``MemAvailable`` of /proc/meminfo) in bytes, or None where it is not
    known (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def host_store_problem(capacity: int, shm_dir: Path, devices: Sequence[str]) -> str | None:
    """Why a host store of ``capacity`` bytes cannot work here for a node of ``devices``, or None."""
    free = shutil.disk_usage(shm_dir).free
    if capacity > free:
        return (f"a host store of {capacity / 1e9:.1f} GB does not fit {shm_dir}, which has {free / 1e9:.1f} GB "
                f"free (the store lives there: SWAPSERVE_SHM_DIR); give --host-store less, or enlarge {shm_dir}")
    available, reserve = available_memory(), reserve_bytes(devices)
    if available is not None and capacity + reserve > available:
        return (f"a host store of {capacity / 1e9:.1f} GB leaves the node's processes less than the "
                f"{reserve / 1e9:.1f} GB they need of this machine's {available / 1e9:.1f} GB of available memory "
                f"(every model stays in page-locked host memory); give --host-store at most "
                f"{max(0, available - reserve) / 1e9:.1f} GB")
    return None


HEAP_ALLOCATIONS_BYTES = 256 * MiB
"""Allocations below this come from the heap, not a mapping of their own (glibc's ``M_MMAP_THRESHOLD``)."""
HEAP_KEPT_BYTES = 512 * MiB
"""Freed memory the heap keeps for later allocations before it gives any back (glibc's ``M_TRIM_THRESHOLD``)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make this process reuse freed memory for its large allocations (glibc; elsewhere nothing changes): the
    outputs the controller still copies out of the IO slabs (where no block of the answers part is free,
    :mod:`swapserve.node.answers`, and small ones) go into fresh tensors, which glibc maps anew
    (above its adaptive threshold, or once more is free than its trim threshold) and unmaps when freed, so every
    copy also faulted in every page it wrote. A batch of four GPT-2 answers (52 MB) took 9.1 ms to copy that way
    on an H200 machine and 3.5 ms on memory the heap kept (29 and 8 ms on the CI box; ``bench/copy_out.py``). The
    price is memory the heap holds on to: in a mix of answers of every size, 950 MiB resident against 688 MiB,
    steady over 60,000 of them. Returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATIONS_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False
