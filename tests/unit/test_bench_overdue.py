"""bench/overdue.py on a run log and a stall log written as bench/trace.py --raw writes them."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import overdue  # noqa: E402  (bench/overdue.py)


def _run(past_ms: float, kind: str = "run", swapped: bool = False, expected_ms: float = 3.0) -> dict:
    return {"device": "cuda:0", "lane": 0, "function": "f", "kind": kind, "requests": 1, "source": "host",
            "swapped": swapped, "bytes_copied": 0, "wall_ms": expected_ms, "expected_ms": expected_ms,
            "begun_s": 1.0, "ended_s": 1.0 + (expected_ms + past_ms) / 1e3}


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_remaining_counts_only_what_is_still_unanswered_that_late() -> None:
    runs = [_run(x) for x in (-0.5, 0.3, 0.6, 1.5, 1.8, 2.5, 3.0, 9.0)] + [_run(5.0, "piece", True)]
    rows = {(k, o): (n, m, med, mean) for k, n, o, m, med, mean in overdue.remaining(runs, [0.0, 1.0, 2.0])}
    assert rows[("resident run", 0.0)] == (8, 7, pytest.approx(1.8), pytest.approx(18.7 / 7))
    assert rows[("resident run", 1.0)] == (8, 5, pytest.approx(1.5), pytest.approx(12.8 / 5))
    assert rows[("resident run", 2.0)] == (8, 3, None, None)  # too few for a median
    assert rows[("piece", 0.0)] == (1, 1, None, None)
    assert not any(k == "swapped run" for k, _ in rows)


def test_the_report_reads_each_replay_s_run_log_and_its_stalls(tmp_path: Path) -> None:
    _write(tmp_path / "trace_raw" / "runs" / "swapserve_10.jsonl.xz", [_run(0.1 * i) for i in range(10)])
    _write(tmp_path / "trace_raw" / "stalls" / "swapserve_10.jsonl.xz", [
        {"what": "loop", "cpu_ms": 1.0, "begun_s": 1.0, "ended_s": 1.002},
        {"what": "loop", "cpu_ms": 0.5, "begun_s": 2.0, "ended_s": 2.004},
        {"what": "gc 2", "cpu_ms": 3.0, "begun_s": 3.0, "ended_s": 3.003}])
    out = subprocess.run([sys.executable, str(BENCH / "overdue.py"), str(tmp_path), "--overdue-ms", "0.25"],
                         capture_output=True, text=True, check=True).stdout
    assert f"| resident run | 10 | 0.25 | 7 | {0.35:.2f} | {0.35:.2f} |" in out
    assert "| loop | 2 | 3.00 | 4.00 | 6 | 25% |" in out
    assert "| gc | 1 | 3.00 | 3.00 | 3 | 100% |" in out


def test_a_trace_without_a_run_log_says_so(tmp_path: Path) -> None:
    assert "no run log" in overdue.report(tmp_path, [1.0])
