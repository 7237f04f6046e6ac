"""How much host memory a node's host store may take: the shared-memory directory's free space, and the machine's
available memory less what the node's processes need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swapserve import hostmem
from swapserve.config import GiB


def test_a_store_larger_than_the_shared_memory_directory_is_refused(tmp_path: Path):
    problem = hostmem.host_store_problem(1 << 60, tmp_path, ["cpu"])
    assert problem is not None and f"does not fit {tmp_path}" in problem and "--host-store" in problem


def test_a_store_that_leaves_the_processes_too_little_memory_is_refused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hostmem, "available_memory", lambda: 12 * GiB)
    gpus = ["cuda:0", "cuda:1"]
    fits = 12 * GiB - hostmem.NODE_RESERVE_BYTES - 2 * hostmem.GPU_WORKER_RESERVE_BYTES
    assert hostmem.host_store_problem(fits, tmp_path, gpus) is None
    problem = hostmem.host_store_problem(fits + 1, tmp_path, gpus)
    assert problem is not None and "page-locked" in problem and f"at most {fits / 1e9:.1f} GB" in problem
    assert hostmem.host_store_problem(fits, tmp_path, [*gpus, "cuda:2"]) is not None  # each worker needs its share
    assert hostmem.host_store_problem(fits, tmp_path, ["cpu"]) is None  # a CPU worker needs less


def test_available_memory_is_this_machines():
    got = hostmem.available_memory()
    assert got is None or 0 < got < 1 << 50



MIX = """
import collections, ctypes, random, resource, sys, torch
from swapserve.hostmem import keep_freed_memory
# Faults counted in base pages: transparent huge pages, where the kernel has them to give, fault in 2 MiB at once
# and made the count depend on the machine's fragmentation (one CI run: 53 thousand by default, 28 kept).
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
kept = sys.argv[1] == "kept" and keep_freed_memory()
rng, live, faults = random.Random(0), collections.deque(), []
for half in range(2):  # the first warms the heap up; the second is measured
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(1500):
        kind = rng.random()
        sizes = ([12_867_584] * rng.choice((1, 2, 4)) if kind < 0.1 else [rng.randint(200_000, 2_000_000)]
                 if kind < 0.4 else [rng.randint(100, 20_000)])
        outs = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes]
        live.append((outs, [bytes(rng.randint(600, 5000)) for _ in range(rng.randint(0, 20))]))
        while len(live) > rng.randint(5, 60):
            live.popleft()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, faults[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_freed_memory_spares_the_controllers_allocations_their_page_faults():
    """A controller's allocations, sped up: answers of every size (a tenth of them batches of GPT-2's 12.9 MB
    logits) and request-sized buffers, with overlapping lifetimes. Once the heap is warm, the default allocator
    still maps and faults in the large ones anew (~450 thousand faults of base pages on the CI box); kept, the
    heap reuses their pages (~28 thousand)."""
    got = {}
    for mode in ("default", "kept"):
        done = subprocess.run([sys.executable, "-c", MIX, mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        kept, faults = done.stdout.split()
        assert kept == str(mode == "kept")
        got[mode] = int(faults)
    assert 2 * got["kept"] < got["default"], got
