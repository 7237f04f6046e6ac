"""bench/by_canary.py on trace.json files shaped as bench/trace.py writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import by_canary  # noqa: E402  (bench/by_canary.py)


def _trace(path: Path, gpus: int, points: list[dict], date: str = "2026-12-01") -> None:
    path.mkdir(parents=True, exist_ok=True)
    doc = {"gpu": "NVIDIA H200", "gpus": gpus, "date": date, "fronts": 0,
           "policies": {"swapserve": {"max_functions": 0, "sweep": points, "options": {"fronts": 2}},
                        "lru_ondemand": {"max_functions": 0, "sweep": [
                            {"n": 400, "attainment": 0.1, "cpu_canary": {"median_ms": 0.5}}]}}}
    (path / "trace.json").write_text(json.dumps(doc))


def _point(n: int, attainment: float, canary: float | None, **more: object) -> dict:
    return {"n": n, "attainment": attainment, "requests_in_slo": 0.99,
            "cpu_canary": {"median_ms": canary} if canary is not None else None, **more}


def test_each_replay_of_the_asked_point_with_its_canary_sorted(tmp_path: Path) -> None:
    _trace(tmp_path / "a", 1, [_point(300, 1.0, 0.6), _point(400, 0.97, 0.95)])
    _trace(tmp_path / "b" / "c", 1, [_point(400, 0.99, 0.6, attainment_runs=[0.99, 0.95],
                                            requests_in_slo_runs=[0.999, 0.98])])
    _trace(tmp_path / "d", 2, [_point(400, 1.0, 0.5)])  # another count of GPUs
    _trace(tmp_path / "e", 1, [_point(400, 0.5, None)])  # no canary recorded
    _trace(tmp_path / "f", 1, [_point(400, 0.4, 0.7)], date="2026-11-28")  # before --since
    _trace(tmp_path / "b", 1, [_point(400, 0.99, 0.6, attainment_runs=[0.99, 0.95],
                                      requests_in_slo_runs=[0.999, 0.98])])  # a copy of b/c's, as a headline
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "trace.json").write_text("{not json")
    rows = by_canary.replays([tmp_path], 1, 400, "swapserve", since="2026-11-30")
    assert [(r["canary_ms"], r["attainment"], r["requests_in_slo"]) for r in rows] == [
        (0.6, 0.99, 0.999), (0.6, 0.95, 0.98), (0.95, 0.97, 0.99)]
    assert all(r["fronts"] == 2 for r in rows)  # the policy's own options first
    assert rows[0]["path"] == tmp_path / "b" / "trace.json"  # the copy's replays once, under the shorter path
    assert by_canary.bands(rows, [0.7, 0.9]) == [("≤ 0.7 ms", 2, 1), ("0.7–0.9 ms", 0, 0), ("> 0.9 ms", 1, 0)]


def test_the_script_prints_the_table_and_the_bands(tmp_path: Path) -> None:
    _trace(tmp_path / "a", 1, [_point(400, 0.985, 0.55), _point(400, 0.9, 1.05)])
    out = subprocess.run([sys.executable, str(BENCH / "by_canary.py"), str(tmp_path), "--bands", "0.8",
                          "--plot", str(tmp_path / "by_canary.png")], capture_output=True, text=True, check=True).stdout
    assert "2 replays with a canary" in out
    assert "| 0.550 | 0.985 | 0.9900 | 2 | 2026-12-01 | `a/trace.json` |" in out
    assert "| ≤ 0.8 ms | 1 | 1 |" in out and "| > 0.8 ms | 1 | 0 |" in out
    assert (tmp_path / "by_canary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
