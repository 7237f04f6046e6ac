"""bench/serving_cost.py runs end to end on the CPU (a real node, its three request shapes), so that the GPU
session that measures with it does not find it broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_cost_measures_every_shape(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serving_cost.py"), "--out", str(tmp_path),
                           "--devices", "cpu", "--requests", "3", "--warmup", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "serving_cost.json").read_text())
    assert result["gpu"] == "cpu" and set(result["shapes"]) == {"image", "hidden", "logits"}
    logits = result["shapes"]["logits"]
    assert logits["output_bytes"] == 128 * 50257 * 2 and logits["requests"] == 3
    assert all(r["cpu_ms_per_request"] >= 0 and r["p50_rtt_ms"] > 0 for r in result["shapes"].values())
    assert (tmp_path / "serving_cost.md").read_text().count("|") > 20 and (tmp_path / "serving_cost.png").exists()
