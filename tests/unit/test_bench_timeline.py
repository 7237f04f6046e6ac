"""bench/timeline.py on a trace directory of raw records written as bench/trace.py --raw writes them."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _record(function: str, at_s: float, device: str = "cuda:0", lane: int = 0, queue_ms: float = 0.1,
            latency_ms: float = 5.0, status: int = 200, reason: str = "") -> dict:
    return {"function": function, "at_s": at_s, "status": status, "reason": reason, "device": device, "lane": lane,
            "queue_ms": queue_ms, "latency_ms": latency_ms, "worker_ms": 3.0, "compute_ms": 2.5,
            "expected_ms": 2.8, "budget_ms": 9.5, "copy_ms": 1.0}


def _write(directory: Path, name: str, records: list[dict]) -> None:
    (directory / "trace_raw").mkdir(exist_ok=True)
    with lzma.open(directory / "trace_raw" / name, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "timeline.py"), *args], capture_output=True, text=True)


def test_it_lists_a_window_s_answers_per_lane_in_the_order_sent_and_the_refused_apart(tmp_path: Path) -> None:
    _write(tmp_path, "swapserve_10.jsonl.xz", [
        _record("late-big", 1.000, queue_ms=20.0, latency_ms=40.0),  # came first, sent last on its lane
        _record("small", 1.005),
        _record("side", 1.002, lane=1),
        _record("other-gpu", 1.001, device="cuda:1"),
        _record("outside", 1.200),
        _record("refused", 1.003, status=503, reason="cannot meet the deadline: expected # ms late"),
    ])
    result = _run(str(tmp_path), "--from", "1.0", "--to", "1.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listed = [line.split("|")[3].strip() for line in lines[2:6]]
    assert listed == ["small", "late-big", "side", "other-gpu"]
    assert lines[3].split("|")[5].strip() == "1020.0"  # sent = at + queue
    assert "outside" not in result.stdout
    assert lines[-1] == "- 1003.0 refused: 503 cannot meet the deadline: expected # ms late"
    assert "the node's run log" not in result.stdout  # none recorded (a trace from before it)
    only_first = _run(str(tmp_path), "--from", "1.0", "--to", "1.1", "--lane", "0").stdout
    assert "| side |" not in only_first and "| small |" in only_first


def test_a_directory_of_several_replays_needs_one_named(tmp_path: Path) -> None:
    _write(tmp_path, "swapserve_10.jsonl.xz", [_record("a", 1.0)])
    _write(tmp_path, "swapserve_20.jsonl.xz", [_record("b", 1.0)])
    result = _run(str(tmp_path), "--from", "0", "--to", "2")
    assert result.returncode != 0 and "--replay" in result.stderr
    named = _run(str(tmp_path), "--from", "0", "--to", "2", "--replay", "swapserve_20")
    assert named.returncode == 0 and "| b |" in named.stdout and "| a |" not in named.stdout
    assert "no replay 'swapserve_30'" in _run(str(tmp_path), "--from", "0", "--to", "2",
                                              "--replay", "swapserve_30").stderr


def test_the_node_s_run_log_adds_what_the_lanes_ran_with_no_request_of_their_own(tmp_path: Path) -> None:
    _write(tmp_path, "swapserve_10.jsonl.xz", [_record("big", 1.000, queue_ms=9.0, latency_ms=20.0)])
    (tmp_path / "trace_raw" / "runs").mkdir()
    run = {"device": "cuda:0", "lane": 0, "function": "big", "requests": 0, "source": "host", "swapped": True,
           "bytes_copied": 150_000_000, "wall_ms": 3.1, "expected_ms": 3.0}
    with lzma.open(tmp_path / "trace_raw" / "runs" / "swapserve_10.jsonl.xz", "wt") as f:
        for kind, begun, ended in (("piece", 1.001, 1.004), ("piece", 1.005, 1.008), ("run", 1.009, 1.019),
                                   ("run", 2.0, 2.01)):
            f.write(json.dumps({**run, "kind": kind, "begun_s": begun, "ended_s": ended}) + "\n")
    out = _run(str(tmp_path), "--from", "1.0", "--to", "1.1").stdout
    lanes = out.split("the node's run log):")[1].strip().splitlines()[2:]
    assert [line.split("|")[4].strip() for line in lanes] == ["piece", "piece", "run"]
    assert lanes[0].split("|")[5:7] == [" 1001.0 ", " 1004.0 "] and lanes[0].split("|")[10].strip() == "150"


def test_the_controller_s_stalls_in_the_window_are_listed_last(tmp_path: Path) -> None:
    _write(tmp_path, "swapserve_10.jsonl.xz", [_record("a", 1.000)])
    assert "stalls" not in _run(str(tmp_path), "--from", "1.0", "--to", "1.1").stdout  # none recorded (before them)
    (tmp_path / "trace_raw" / "stalls").mkdir()
    with lzma.open(tmp_path / "trace_raw" / "stalls" / "swapserve_10.jsonl.xz", "wt") as f:
        for what, begun, ended in (("loop", 1.0311, 1.0353), ("gc 2", 1.5, 1.502)):
            f.write(json.dumps({"what": what, "begun_s": begun, "ended_s": ended, "cpu_ms": 0.3}) + "\n")
    out = _run(str(tmp_path), "--from", "1.0", "--to", "1.1").stdout.splitlines()
    assert out[-2:] == ["The controller's stalls (swapserve_10): 1",
                        "- 1031.1 to 1035.3: loop, 4.2 ms, of its CPU 0.3 ms"]
    assert _run(str(tmp_path), "--from", "2.0", "--to", "2.1").stdout.splitlines()[-1] == (
        "The controller's stalls (swapserve_10): none")
