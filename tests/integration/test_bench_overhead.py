"""bench/overhead.py runs end to end on the CPU (a real node), with the node and the clients pinned to CPUs of
their own, so that the GPU session that measures with it does not find it broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin the node and the clients apart")
def test_overhead_measures_with_the_node_and_the_clients_pinned_apart(tmp_path: Path) -> None:
    server, client = sorted(os.sched_getaffinity(0))[:2]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--out", str(tmp_path),
                           "--devices", "cpu", "--requests", "50", "--warmup", "5", "--seconds", "0.5",
                           "--clients", "1", "--concurrency", "2", "--server-cpus", str(server),
                           "--client-cpus", str(client)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert result["gpu"] == "cpu"
    assert result["p99_overhead_ms"] >= result["p50_overhead_ms"] > 0 and result["max_rps"] > 0
    assert result["server_cpus"] == [server] and result["client_cpus"] == [client]
    assert sum(v["requests"] for v in result["by_lane"].values()) == 50  # every measured request, by its lane
    assert all(v["p50_compute_ms"] > 0 for v in result["by_lane"].values())
