"""bench/miss_causes.py: which part of a missing function's worst request was largest."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def mc():
    sys.path.insert(0, str(BENCH))  # its import of bench/trace.py
    try:
        spec = importlib.util.spec_from_file_location("bench_miss_causes", BENCH / "miss_causes.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("trace", None)  # bench/trace.py, not the standard library's


def rec(fn: str, latency: float, *, status: int = 200, queue: float = 0.0, server: float | None = None,
        node: float | None = None, worker: float = 1.0, swapped: bool = False, device: float = 0.5,
        place: float = 0.05) -> dict:
    server = latency - 1.0 if server is None else server
    node = server - 0.5 if node is None else node
    return {"function": fn, "latency_ms": latency, "status": status, "queue_ms": queue, "server_ms": server,
            "node_ms": node, "worker_ms": worker, "swapped": swapped,
            "phases_ms": {"place": place, "device": device}}


def test_each_missing_function_counts_under_its_worst_requests_largest_part(mc):
    slo = {"small": 10.0, "big": 40.0}
    records = [
        rec("f0-small", 5.0), rec("f0-small", 6.0),  # met
        rec("f1-small", 5.0), rec("f1-small", 14.0, queue=8.0, server=13.0, node=12.5, worker=2.0),  # queued
        rec("f2-small", 12.0, server=4.0, node=3.5, worker=2.0),  # 8 ms outside the gateway: client side
        rec("f3-small", 0.0, status=503),  # refused
        rec("f4-big", 50.0, swapped=True, device=30.0, server=49.0, node=48.5, worker=31.0),  # the swap
    ]
    got = mc.analyse(records, slo)
    assert got["functions"] == 5 and got["missed"] == 4
    assert got["worst_part"] == {"queue": 1, "client": 1, "refused": 1, "swap": 1}
    # without queueing f1 would have met its SLO; nothing else changes
    assert got["attainment_without_queueing"] == 0.4
