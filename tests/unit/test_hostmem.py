"""How much host memory a node's host store may take: the shared-memory directory's free space, and the machine's
available memory less what the node's processes need."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapserve import hostmem
from swapserve.config import GiB


def test_a_store_larger_than_the_shared_memory_directory_is_refused(tmp_path: Path):
    problem = hostmem.host_store_problem(1 << 60, tmp_path, workers=1)
    assert problem is not None and f"does not fit {tmp_path}" in problem and "--host-store" in problem


def test_a_store_that_leaves_the_processes_too_little_memory_is_refused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hostmem, "available_memory", lambda: 12 * GiB)
    reserve = hostmem.NODE_RESERVE_BYTES + 2 * hostmem.WORKER_RESERVE_BYTES  # two workers
    fits = 12 * GiB - reserve
    assert hostmem.host_store_problem(fits, tmp_path, workers=2) is None
    problem = hostmem.host_store_problem(fits + 1, tmp_path, workers=2)
    assert problem is not None and "page-locked" in problem and f"at most {fits / 1e9:.1f} GB" in problem
    assert hostmem.host_store_problem(fits, tmp_path, workers=3) is not None  # each worker needs its share


def test_available_memory_is_this_machines():
    got = hostmem.available_memory()
    assert got is None or 0 < got < 1 << 50
