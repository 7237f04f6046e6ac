"""bench/remap_phases.py on a trace directory of raw records written as bench/trace.py --raw writes them."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_it_pools_the_swapped_runs_remaps_and_names_the_slow_ones(tmp_path: Path) -> None:
    raw = tmp_path / "trace_raw"
    raw.mkdir()
    records = [
        {"at_s": 1.0, "status": 200, "swapped": True, "phases_ms": {"place_remap": 0.5, "place_remap_cpu": 0.4}},
        {"at_s": 2.0, "status": 200, "swapped": True, "phases_ms": {"place_remap": 3.5, "place_remap_cpu": 0.5}},
        {"at_s": 3.0, "status": 200, "swapped": True, "phases_ms": {"place_remap": 0.3, "place_remap_cpu": 0.3}},
        {"at_s": 4.0, "status": 200, "swapped": False, "phases_ms": {"place_remap": 9.0, "place_remap_cpu": 0.0}},
        {"at_s": 5.0, "status": 503, "swapped": True, "phases_ms": {}},
    ]
    with gzip.open(raw / "swapserve_10.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "remap_phases.py"), str(tmp_path), "--over", "2"],
                         capture_output=True, text=True, check=True).stdout
    row = out.splitlines()[2].split("|")
    cells = [c.strip() for c in row[2:-1]]
    assert cells[0] == "3"  # the resident run and the refused one are not counted
    assert cells[1] == "0.500" and cells[2] == "1.433"  # p50, mean of 0.5, 3.5, 0.3
    assert cells[4] == "0.400" and cells[5] == "1" and cells[6] == "3.5 at 2.0 s"
