"""How many cores the node counts as usable: its affinity, capped by a container's CPU quota (cgroup v2 or v1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swapserve.hostcpu import usable_cores


@pytest.fixture
def cores16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)


def _v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize("cpu_max, cores", [("max 100000\n", 16), ("200000 100000\n", 2), ("150000 100000\n", 2),
                                            ("5000 100000\n", 1), ("3200000 100000\n", 16)])
def test_a_cgroup_v2_quota_caps_the_affinity(tmp_path: Path, cores16: None, cpu_max: str, cores: int) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cores(tmp_path) == cores


@pytest.mark.parametrize("quota, cores", [("-1", 16), ("400000", 4), ("50000", 1)])
def test_a_cgroup_v1_quota_caps_the_affinity(tmp_path: Path, cores16: None, quota: str, cores: int) -> None:
    assert usable_cores(_v1(tmp_path, quota)) == cores


def test_no_cgroup_files_or_unreadable_ones_leave_the_affinity(tmp_path: Path, cores16: None) -> None:
    assert usable_cores(tmp_path / "absent") == 16
    (tmp_path / "cpu.max").write_text("garbage\n")  # a v2 file that says no quota
    assert usable_cores(tmp_path) == 16
    assert usable_cores(_v1(tmp_path / "v1", "abc")) == 16


def test_this_machine_has_at_least_one_usable_core() -> None:
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
