"""bench/node_harness.py's CPU lists (as ``taskset -c`` takes them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from node_harness import cpu_list  # noqa: E402


@pytest.mark.parametrize("text, cpus", [("3", {3}), ("0-3", {0, 1, 2, 3}), ("0,2,4", {0, 2, 4}),
                                        ("0-1, 8-9", {0, 1, 8, 9})])
def test_cpu_lists_read_as_taskset_writes_them(text: str, cpus: set[int]) -> None:
    assert cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "-2", "1-x"])
def test_what_is_not_a_cpu_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        cpu_list(text)
