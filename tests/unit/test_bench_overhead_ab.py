"""bench/overhead_ab.py on run directories as bench/overhead.py writes them: pairs read in order, differences
taken within each pair, the table, JSON and plot written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
PARTS = ("http", "read", "gateway", "queue", "dispatch", "to_worker", "worker", "from_worker", "controller")


def _run(root: Path, name: str, p50: float, worker: float) -> None:
    (root / name).mkdir()
    parts = {k: 0.05 for k in PARTS} | {"worker": worker}
    (root / name / "overhead.json").write_text(json.dumps({
        "p50_overhead_ms": p50, "p99_overhead_ms": 2 * p50, "max_rps": 5000.0, "cpu_canary": {"median_ms": 0.6},
        "p50_parts_ms": parts}))


def test_pairs_are_compared_within_themselves(tmp_path: Path) -> None:
    _run(tmp_path, "new_1", 0.48, 0.03)
    _run(tmp_path, "base_1", 0.60, 0.06)
    _run(tmp_path, "base_2", 0.90, 0.06)
    _run(tmp_path, "new_2", 0.95, 0.03)  # a slower machine for the second pair: new is worse than base_1 here
    _run(tmp_path, "new_3", 0.40, 0.03)  # no base_3: not a pair, left out
    done = subprocess.run([sys.executable, str(BENCH / "overhead_ab.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert [p["pair"] for p in ab["pairs"]] == [1, 2]
    assert [p["first"] for p in ab["pairs"]] == ["new", "base"]
    assert [round(p["p50_diff_ms"], 3) for p in ab["pairs"]] == [-0.12, 0.05]
    assert round(ab["pairs"][0]["parts_diff_ms"]["worker"], 3) == -0.03
    md = (tmp_path / "ab.md").read_text()
    assert "p50 lower with new in 1 of 2 pairs" in md and "at or under 0.5 ms: new 1, base 0" in md
    assert (tmp_path / "ab.png").stat().st_size > 0


def test_a_directory_without_pairs_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "overhead_ab.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "no pairs" in done.stderr
