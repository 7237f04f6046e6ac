"""The trace generator of bench/trace.py: steady arrival rates from the first second on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def trace_module():
    sys.path.insert(0, str(BENCH))  # its own imports (node_harness, report_trace) live beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_trace", BENCH / "trace.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_trace"] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_trace", None)
        sys.path.remove(str(BENCH))


def test_rates_follow_the_issue(trace_module):
    fns = trace_module.make_functions(2000, ["a", "b"], {"a": 10.0, "b": 20.0}, seed=0)
    rates = np.array([f.rate for f in fns]) * 60
    assert rates.min() >= 1 and rates.max() <= 60
    assert 5 < np.median(rates) < 7  # log-normal around 6 req/min
    assert [f.model for f in fns[:4]] == ["a", "b", "a", "b"]  # round-robin over the zoo


def test_same_seed_same_trace(trace_module):
    fns = trace_module.make_functions(50, ["a"], {"a": 10.0}, seed=3)
    assert trace_module.make_trace(fns, 30, 3) == trace_module.make_trace(fns, 30, 3)
    assert trace_module.make_trace(fns, 30, 3) != trace_module.make_trace(fns, 30, 4)


def test_no_burst_at_the_start(trace_module):
    """Each stream starts in its steady state: the first seconds carry the mean rate, not a synchronized
    burst of every function's first request (what a random phase into an ordinary gap gave at CV 2)."""
    fns = trace_module.make_functions(300, ["a"], {"a": 10.0}, seed=0)
    total_rate = sum(f.rate for f in fns)
    first, later = [], []
    for seed in range(20):
        t = np.array([x for x, _ in trace_module.make_trace(fns, 20.0, seed)])
        first.append(np.sum(t < 1.0))
        later.append(np.sum((t >= 10.0) & (t < 20.0)) / 10.0)
    # Averaged over seeds, arrivals in [0, 1) s match those of any later second and the mean rate.
    assert np.mean(first) == pytest.approx(total_rate, rel=0.15)
    assert np.mean(first) == pytest.approx(np.mean(later), rel=0.15)


def test_bursty_within_a_function(trace_module):
    """Gamma inter-arrival times with CV 2."""
    fns = [trace_module.Fn("f", "a", 10.0, 1.0)]
    t = np.array([x for x, _ in trace_module.make_trace(fns, 200_000.0, 0)])
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)


def test_large_responses_get_client_processes_of_their_own(trace_module):
    large = [i % 10 == 9 for i in range(40)]  # one model in ten answers with large bodies (GPT-2 in the zoo)
    owner = trace_module.client_of(large, 8)
    assert {owner[i] for i in range(40) if large[i]} == {0, 1}
    assert {owner[i] for i in range(40) if not large[i]} == set(range(2, 8))
    assert trace_module.client_of(large, 1) == [0] * 40
    assert trace_module.client_of([False] * 5, 4) == [0, 1, 2, 3, 0]


def test_a_point_replayed_is_its_median_run_with_every_attainment(trace_module):
    runs = [{"attainment": a, "p50_ms": i, "requests_in_slo": 0.9 + a / 10} for i, a in enumerate((0.5, 0.3, 0.4, 0.6))]
    point = trace_module.median_run(runs)
    assert (point["attainment"], point["p50_ms"]) == (0.4, 2)  # the lower middle, all of its numbers
    assert point["attainment_runs"] == [0.5, 0.3, 0.4, 0.6]
    assert point["requests_in_slo_runs"] == pytest.approx([0.95, 0.93, 0.94, 0.96])
    assert "attainment_runs" not in trace_module.median_run(runs[:1])


def test_phase_medians_of_the_runs_that_reported_them(trace_module):
    def row(phases: dict) -> tuple:
        return (0, 0.0, 5.0, 200, 0.1, 4.0, False, 4.5, 4.4, 4.9, "", 0.2, 4.1, 1, phases)

    rows = [row({"wait": 0.0, "upload": 0.1, "place": 0.2, "device": d, "output": 0.3, "place_remap": 0.1})
            for d in (1.0, 2.0, 9.0)]
    got = trace_module.phases(rows + [row({})])  # a run without phases (an older node) does not count
    assert got == {"runs": 3, "wait": 0.0, "upload": 0.1, "place": 0.2, "device": 2.0, "output": 0.3,
                   "place_lock": 0.0, "place_remap": 0.1, "place_remap_cpu": 0.0}
    assert trace_module.phases([row({})]) is None


def _rec(fn: str, latency: float, *, status: int = 200, queue: float = 0.0, server: float | None = None,
         node: float | None = None, worker: float = 1.0, swapped: bool = False, device: float = 0.5) -> dict:
    server = latency - 1.0 if server is None else server
    node = server - 0.5 if node is None else node
    return {"function": fn, "latency_ms": latency, "status": status, "queue_ms": queue, "server_ms": server,
            "node_ms": node, "worker_ms": worker, "swapped": swapped, "phases_ms": {"place": 0.05, "device": device}}


MISSES = [
    _rec("f0-small", 5.0), _rec("f0-small", 6.0),  # met
    _rec("f1-small", 5.0), _rec("f1-small", 14.0, queue=8.0, server=13.0, node=12.5, worker=2.0),  # queued
    _rec("f2-small", 12.0, server=4.0, node=3.5, worker=2.0),  # 8 ms outside the gateway: client side
    _rec("f3-small", 0.0, status=503),  # refused
    _rec("f4-big", 50.0, swapped=True, device=30.0, server=49.0, node=48.5, worker=31.0),  # the swap
]


def test_each_missing_function_counts_under_its_worst_requests_largest_part(trace_module):
    slo = {f"f{i}-small": 10.0 for i in range(4)} | {"f4-big": 40.0}
    got = trace_module.miss_causes(MISSES, slo)
    assert got["missed"] == 4
    assert got["worst_part"] == {"queue": 1, "client": 1, "refused": 1, "swap": 1}
    assert got["attainment_without_queueing"] == 0.4  # without queueing f1 would have met its SLO too


def test_a_wait_in_the_workers_lane_counts_as_queueing_in_the_lane(trace_module):
    """Queued ahead behind another run, a request waits in the worker: what its phases do not cover of the
    worker's time (the place parts are inside place, not added again). It is queueing (removed for the
    attainment without queueing) and a part of its own, ``lane``."""
    r = _rec("f0-small", 14.0, server=13.0, node=12.5, worker=9.0, device=0.5)
    r["phases_ms"].update(place_lock=0.01, place_remap=0.03)
    assert trace_module.lane_ms(r) == pytest.approx(9.0 - 0.55)
    assert trace_module.queued_ms(r) == pytest.approx(9.0 - 0.55)  # (queue_ms 0 in this record)
    got = trace_module.miss_causes([r], {"f0-small": 10.0})
    assert got["worst_part"] == {"lane": 1} and got["attainment_without_queueing"] == 1.0


def test_the_way_to_the_worker_and_back_and_the_dispatch_are_parts_of_their_own(trace_module):
    """Records that time the messages' ways (since the ninth session) split what was the controller's part:
    the decision and inputs (dispatch), the pipes both ways, and the rest (admission, the reply's handling)."""
    r = _rec("f0-small", 14.0, server=13.0, node=12.5, worker=2.0)
    r.update(dispatch_ms=0.5, to_worker_ms=6.0, from_worker_ms=1.5)
    parts = trace_module.request_parts(r)
    assert (parts["dispatch"], parts["pipes"]) == (0.5, 7.5)
    assert parts["controller"] == pytest.approx(12.5 - 2.0 - 0.5 - 7.5)
    assert trace_module.miss_causes([r], {"f0-small": 10.0})["worst_part"] == {"pipes": 1}
    old = _rec("f0-small", 14.0, server=13.0, node=12.5, worker=2.0) | {"dispatch_ms": 0.5}  # before: untimed
    assert (trace_module.request_parts(old)["pipes"], trace_module.request_parts(old)["controller"]) == (0.0, 10.5)


def test_the_serving_process_reading_a_request_is_a_part_of_its_own(trace_module):
    """Records with ``read_ms`` (since session 23: the gateway's first bytes read → handler) take it out of the
    client part; older records keep it there."""
    r = _rec("f0-small", 14.0, server=5.0, node=4.5, worker=2.0) | {"read_ms": 6.5}
    parts = trace_module.request_parts(r)
    assert (parts["client"], parts["read"]) == (pytest.approx(2.5), 6.5)
    assert trace_module.miss_causes([r], {"f0-small": 10.0})["worst_part"] == {"read": 1}
    old = _rec("f0-small", 14.0, server=5.0, node=4.5, worker=2.0)
    assert (trace_module.request_parts(old)["client"], trace_module.request_parts(old)["read"]) == (9.0, 0.0)


def test_a_bursts_followers_are_counted_batched_or_alone(trace_module):
    """Within 10 ms of the request before of their function: batched with it (its run: the same run time in
    the same lane), or alone — and then late or not."""
    def at(fn: str, t: float, latency: float, compute: float, lane: int = 0, status: int = 200) -> dict:
        return _rec(fn, latency, status=status) | {"at_s": t, "compute_ms": compute, "lane": lane}

    records = [at("f0-a", 1.0, 5.0, 2.0), at("f0-a", 1.0001, 5.1, 2.0),  # batched
               at("f0-a", 1.0002, 12.0, 1.5),  # alone and late
               at("f0-a", 1.5, 5.0, 2.0),  # not a follower (0.5 s later)
               at("f1-b", 2.0, 5.0, 2.0), at("f1-b", 2.005, 0.5, -1.0, -1, status=503),  # refused follower
               at("f1-b", 2.0051, 6.0, 2.0, 1)]  # alone, in time (after a refusal: not its run)
    got = trace_module.miss_causes(records, {"f0-a": 10.0, "f1-b": 10.0})["followers"]
    assert got == {"requests": 4, "batched": 1, "late_alone": 2, "late": 2}


def test_miss_causes_cli_reads_a_runs_raw_records(tmp_path):
    import gzip
    import json
    import subprocess

    (tmp_path / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0, "big": 40.0}}))
    (tmp_path / "trace_raw").mkdir()
    with gzip.open(tmp_path / "trace_raw" / "swapserve_5.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in MISSES)
    out = subprocess.run([sys.executable, str(BENCH / "miss_causes.py"), str(tmp_path / "trace.json")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    name, doc = out.strip().split(" ", 1)
    got = json.loads(doc)
    assert name == "swapserve_5" and got["functions"] == 5 and got["missed"] == 4 and got["worst_part"]["queue"] == 1


def test_miss_causes_cli_lists_the_late_requests_with_their_parts(tmp_path):
    import gzip
    import json
    import subprocess

    (tmp_path / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0, "big": 40.0}}))
    (tmp_path / "trace_raw").mkdir()
    records = [{**r, "at_s": float(i), "compute_ms": r["worker_ms"]} for i, r in enumerate(MISSES)]
    with gzip.open(tmp_path / "trace_raw" / "swapserve_5.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "miss_causes.py"), str(tmp_path / "trace.json"), "--late"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # The answered requests over their SLO, in send order: f1's queued one, f2's, f4's swap (not the refusal).
    assert [r.split(" | ")[1] for r in rows] == ["small", "small", "big"]
    queued = dict(zip(("at", "model", "latency", "slo", "run", "client", "read", "gateway", "controller", "queue"),
                      (c.strip() for c in rows[0].strip("|").split("|"))))
    assert queued == {"at": "3.00", "model": "small", "latency": "14.0", "slo": "10.0", "run": "2.0",
                      "client": "1.0", "read": "0.0", "gateway": "0.5", "controller": "2.5", "queue": "8.0"}


def test_followers_cli_says_how_long_after_its_leader_each_follower_finished(tmp_path):
    """Within 1 ms of the one before of its function: its finish after that one's (latency + gap − the
    leader's latency), by whether the leader swapped, and how many were late."""
    import gzip
    import json
    import subprocess

    def at(fn: str, t: float, latency: float, swapped: bool = False) -> dict:
        return _rec(fn, latency, swapped=swapped) | {"at_s": t}

    records = [at("f0-small", 1.0, 6.0, swapped=True), at("f0-small", 1.0005, 5.6),  # batched: +0.1
               at("f0-small", 2.0, 3.0), at("f0-small", 2.0002, 12.0),  # run apart, late: +9.2
               at("f0-small", 2.5, 3.0), at("f1-small", 2.5, 3.0),  # neither follows one of its own
               at("f1-small", 3.0, 3.0), at("f1-small", 3.002, 3.0)]  # 2 ms later: not a follower
    (tmp_path / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0}}))
    (tmp_path / "trace_raw").mkdir()
    with gzip.open(tmp_path / "trace_raw" / "swapserve_5.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "followers.py"), str(tmp_path / "trace.json")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:]]
    name = f"{tmp_path.name}/swapserve_5"
    assert rows == [[name, "swapped", "1", "+0.10", "+0.10", "0"], [name, "resident", "1", "+9.20", "+9.20", "1"]]


def test_repeat_misses_cli_pools_the_replays_of_a_point_by_function(tmp_path, trace_module):
    """Every replay of one point (a point's single file and its ``_r<k>`` files, across trace.json files) pooled:
    each missing function with the replays it missed in, when its worst request was sent and its largest part.
    Raw files are read whether xz (written since 2026-11-30's twenty-ninth session) or gzip (before)."""
    import json
    import subprocess

    def at(fn: str, t: float, latency: float, **kw) -> dict:
        return _rec(fn, latency, **kw) | {"at_s": t}

    replays = {  # f1 misses in both (queued, then refused), f2 in one only, f0 in neither
        "a/trace_raw/swapserve_5.jsonl.gz": [at("f0-small", 1.0, 5.0), at("f1-small", 2.0, 14.0, queue=8.0,
                                                                          server=13.0, node=12.5, worker=2.0)],
        "b/trace_raw/swapserve_5_r0.jsonl.xz": [at("f0-small", 1.0, 6.0), at("f1-small", 2.0, 0.0, status=503),
                                                at("f2-small", 3.0, 12.0, server=4.0, node=3.5, worker=2.0)],
        "b/trace_raw/swapserve_10.jsonl.gz": [at("f9-small", 1.0, 0.0, status=503)],  # another point: not pooled
    }
    for name, records in replays.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        with trace_module.open_raw(tmp_path / name, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    assert (tmp_path / "b/trace_raw/swapserve_5_r0.jsonl.xz").read_bytes().startswith(b"\xfd7zXZ")
    for d in ("a", "b"):
        (tmp_path / d / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0}}))
    traces = [str(tmp_path / d / "trace.json") for d in ("a", "b")]
    out = subprocess.run([sys.executable, str(BENCH / "repeat_misses.py"), "--n", "5", *traces],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("2 replays of swapserve at N = 5: a/swapserve_5, b/swapserve_5_r0; missing functions per "
                          "replay: 1, 2")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[4:]]
    assert rows == [["f1-small", "2 of 2", "2.00, 2.00", "queue, refused"],
                    ["f2-small", "1 of 2", "3.00", "client"]]


def test_late_replies_cli_counts_those_near_a_large_answer(tmp_path):
    """Replies read late (from_worker_ms over 2.5) and how many ended within 10 ms of another request's end of
    the large-output model, against every answered request."""
    import gzip
    import json
    import subprocess

    def at(fn: str, t: float, latency: float, from_worker: float = 0.1, status: int = 200) -> dict:
        return _rec(fn, latency, status=status) | {"at_s": t, "from_worker_ms": from_worker}

    records = [at("f0-gpt2-medium", 1.0, 10.0),  # ends at 1.010
               at("f1-small", 1.001, 5.0, from_worker=4.0),  # late, ends 1.006: near
               at("f1-small", 2.0, 5.0, from_worker=4.0),  # late, nothing near
               at("f1-small", 1.002, 3.0),  # in time, near
               at("f0-gpt2-medium", 3.0, 10.0, from_worker=3.0),  # late, but only itself near
               at("f1-small", 1.003, 0.5, from_worker=9.0, status=503)]  # refused: not counted
    (tmp_path / "trace_raw").mkdir()
    with gzip.open(tmp_path / "trace_raw" / "swapserve_5.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "late_replies.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    row = [c.strip() for c in out.splitlines()[2].strip("|").split("|")]
    assert row == [f"{tmp_path.name}/swapserve_5", "5", "2 (40%)", "3", "1 (33%)"]


def test_estimates_cli_compares_each_run_with_what_the_scheduler_expected(tmp_path):
    import gzip
    import json
    import subprocess

    def run(fn: str, compute: float, expected: float, swapped: bool = False, lane: int = 0) -> dict:
        return _rec(fn, 5.0, swapped=swapped) | {"compute_ms": compute, "expected_ms": expected, "lane": lane}

    (tmp_path / "trace_raw").mkdir()
    replays = [[run("f0-small", 1.0, 2.0), run("f0-small", 1.0, 2.0),  # one batch of two: one run
                run("f0-small", 3.0, 2.0, lane=1), run("f1-big", 30.0, 20.0, swapped=True)],
               [run("f0-small", 2.0, 2.0), _rec("f0-small", 0.0, status=503),
                _rec("f0-small", 4.0) | {"compute_ms": 1.0}]]  # a record from before the estimates: left out
    for i, records in enumerate(replays):
        with gzip.open(tmp_path / "trace_raw" / f"swapserve_5_r{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "estimates.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in out.splitlines()
            if line.startswith("| small") or line.startswith("| big")}
    assert rows.keys() == {("small", "resident", "3"), ("big", "swapped", "1")}
    cells = [c.strip() for c in rows["small", "resident", "3"].strip("|").split("|")]
    assert cells[3:] == ["2.00", "2.00", "0.50", "1.00", "1.50"]  # runs 1, 3, 2 ms against 2 ms expected
    assert [c.strip() for c in rows["big", "swapped", "1"].strip("|").split("|")][5:] == ["1.50"] * 3
    by_batch = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in out.splitlines()
                if line.startswith("| a batch") or line.startswith("| one request")}
    assert by_batch == {("a batch", "resident", "1"), ("one request", "resident", "2"), ("one request", "swapped", "1")}


def test_outside_run_cli_pools_replays_and_splits_resident_from_swapped(tmp_path):
    import gzip
    import json
    import subprocess

    (tmp_path / "trace_raw").mkdir()
    replays = [[_rec("f0-small", 5.0) | {"compute_ms": 1.0}, _rec("f4-big", 50.0, swapped=True) | {"compute_ms": 40.0}],
               [_rec("f0-small", 7.0) | {"compute_ms": 1.0}, _rec("f1-small", 0.0, status=503),
                _rec("f2-gpt2", 90.0) | {"compute_ms": 2.0}]]
    for i, records in enumerate(replays):
        with gzip.open(tmp_path / "trace_raw" / f"swapserve_5_r{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    out = subprocess.run([sys.executable, str(BENCH / "outside_run.py"), str(tmp_path), "--exclude", "gpt2"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    resident, swapped = (line.split(" | ") for line in out[2:])
    # Two answered resident requests (the refusal and the excluded model left out): 4 and 6 ms outside, median 5.
    assert resident[0].endswith("resident") and (resident[1], resident[2]) == ("2", "5.00")
    assert swapped[0].endswith("swapped") and (swapped[1], swapped[2]) == ("1", "10.00")
    assert len(out) == 4


def test_an_alternating_ab_reverses_its_order_every_round(trace_module):
    assert [trace_module.variant_of(k, 2) for k in range(6)] == [0, 1, 1, 0, 0, 1]
    assert [trace_module.variant_of(k, 3) for k in range(6)] == [0, 1, 2, 2, 1, 0]
    assert [trace_module.variant_of(k, 1) for k in range(3)] == [0, 0, 0]


def test_an_alternate_setting_gives_each_value_its_directory(trace_module, tmp_path):
    assert trace_module.alternates(None, tmp_path) == [(tmp_path, {})]
    assert trace_module.alternates("side_fetch=true,false", tmp_path) == [
        (tmp_path / "side_fetch_true", {"side_fetch": True}), (tmp_path / "side_fetch_false", {"side_fetch": False})]
    assert trace_module.alternates("swap_piece_ms=3,0", tmp_path)[1] == (tmp_path / "swap_piece_ms_0", {"swap_piece_ms": 0})
    with pytest.raises(SystemExit, match="SETTING=A,B"):
        trace_module.alternates("side_fetch", tmp_path)


def test_cpu_steal_is_the_share_of_all_cpu_time_the_hypervisor_took(trace_module, tmp_path):
    import steal  # bench/steal.py, on the path with trace.py

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (guest counted in user already)
    stat.write_text("cpu  100 0 50 800 10 0 0 40 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n")
    assert steal.read(stat) == (40, 1000)
    meter = steal.StealMeter(interval_s=60, stat=stat)
    meter.start()
    stat.write_text("cpu  300 0 150 1250 10 0 0 290 7 0\n")  # 1000 jiffies more, 250 of them stolen
    got = meter.stop()
    assert got == {"fraction": 0.25, "max_window": 0.25, "windows": 1, "window_s": 60}
    stat.write_text("cpu  1 2 3 4 5 6 7\n")  # a kernel that counts no steal
    assert steal.read(stat) is None
    assert steal.read(tmp_path / "missing") is None
    quiet = steal.StealMeter(stat=stat)
    quiet.start()
    assert quiet.stop() is None  # nothing to say, nothing made up
    if Path("/proc/stat").exists():  # this machine's own count, sampled on a thread
        real = steal.StealMeter(interval_s=0.05)
        real.start()
        sum(i * i for i in range(200_000))
        got = real.stop()
        assert got is not None and 0.0 <= got["fraction"] <= got["max_window"] + 1e-9 <= 1.0 + 1e-9


def test_the_canary_times_a_fixed_work_in_a_process_of_its_own(trace_module):
    import time

    import canary  # bench/canary.py, on the path with trace.py

    c = canary.Canary(interval_s=0.02)
    assert c.stop() is None  # never started: nothing to say
    c.start()
    time.sleep(1.0)
    got = c.stop()
    assert got is not None and got["samples"] >= 5 and got["interval_s"] == 0.02
    assert 0.0 < got["median_ms"] <= got["p90_ms"] < 1000.0
    assert c.stop() is None  # once
    c = canary.Canary(interval_s=0.02)
    c.start()
    time.sleep(1.0)
    c.mark()  # the measurement begins: the second before it no longer counts
    time.sleep(0.2)
    got = c.stop()
    assert got is not None and 1 <= got["samples"] <= 20  # ~10 in 0.2 s (the second before held ~40)


def test_the_client_keeps_each_answers_parameters_and_first_values(trace_module):
    import torch

    from swapserve.gateway.oip import OutputRequest, encode_infer_response

    logits = torch.arange(20, dtype=torch.float16).reshape(2, 10) / 4
    enc = encode_infer_response("f0001-gpt2-medium", "1", {"logits": logits, "ids": torch.ones(2, 3)},
                                [OutputRequest("logits", True), OutputRequest("ids", True)],
                                parameters={"queue_ms": 0.5})
    kept = enc.body[:enc.header_length + 8 * trace_module.HEAD_VALUES]  # what the client keeps of it
    params, head = trace_module._answer_head(kept, str(enc.header_length))
    assert params == {"queue_ms": 0.5} and head == [i / 4 for i in range(trace_module.HEAD_VALUES)]
    params, head = trace_module._answer_head(kept[:enc.header_length + 6], str(enc.header_length))
    assert head == [0.0, 0.25, 0.5]  # as many whole values as came
    json_only = encode_infer_response("m", "1", {"y": torch.ones(1, 2)}, [OutputRequest("y", False)])
    assert trace_module._answer_head(json_only.body, None) == ({}, [])


def test_an_answer_whose_first_values_are_not_its_models_counts_as_wrong(trace_module):
    ok = {"status": 200, "head": [1.0, -2.0, 3.0]}
    rows = [{**ok, "function": f"f{i:04d}-resnet50"} for i in range(5)]
    rows += [{**ok, "function": "f0005-resnet50", "head": [1.001, -2.001, 3.0]},  # another batch size's sums
             {**ok, "function": "f0006-resnet50", "head": [1.0, 7.5, 3.0]},  # weights not its own
             {**ok, "function": "f0007-resnet50", "head": [float("nan"), -2.0, 3.0]},
             {"status": 503, "function": "f0008-resnet50", "head": []},
             {**ok, "function": "f0009-vgg19", "head": [40.0, 0.5]},
             {**ok, "function": "f0010-vgg19", "head": [40.5, 0.5]},  # within 2 % of 1 + 40
             {**ok, "function": "f0011-vgg19", "head": []}]  # a record from before the client kept values
    assert trace_module.wrong_answers(rows) == {"checked": 10, "wrong": 2, "by_model": {"resnet50": 2}}


def test_the_table_says_the_cpu_steal_canary_longest_run_and_wrong_answers_of_each_point(trace_module):
    import report_trace

    point = {"n": 400, "attainment": 0.8, "requests_in_slo": 0.95, "p50_ms": 7.0, "p99_ms": 40.0,
             "throughput_rps": 60.0, "swaps_per_s": 20.0, "busy_fraction": 0.2, "requests": 1200,
             "status_codes": {"200": 1200}}
    result = {"gpu": "H200", "gpus": 1, "policies": {"swapserve": {"max_functions": 0, "sweep": [
        {**point, "cpu_steal": {"fraction": 0.031, "max_window": 0.2, "windows": 20, "window_s": 1.0},
         "cpu_canary": {"median_ms": 1.234, "p90_ms": 1.5, "samples": 200, "interval_s": 0.1},
         "longest_run_ms": 518.94, "answers": {"checked": 1190, "wrong": 3, "by_model": {"vgg19": 3}}},
        {**point, "n": 200}]}}}
    rows = [line for line in report_trace.table(result).splitlines() if line.startswith("| swapserve |")]
    assert "| 3.1% (max 20.0%) | 1.23 (1.50) | 518.9 | 3 / 1190 (vgg19 3) | 1200 |" in rows[0]
    assert "| - | - | - | - | 1200 |" in rows[1]


def test_each_point_says_where_its_requests_ran_by_device(trace_module):
    import report_trace

    def rec(device: str, swapped: bool, queue_ms: float, status: int = 200) -> dict:
        return {"device": device, "swapped": swapped, "compute_ms": 2.0, "queue_ms": queue_ms, "status": status}

    records = [rec("cuda:0", True, q) for q in range(10)] + [rec("cuda:0", False, 0.5), rec("cuda:1", False, 1.0),
                                                            rec("", False, -1.0, status=503)]
    got = trace_module.by_device(records)
    assert list(got) == ["cuda:0", "cuda:1"]  # a refused request ran nowhere
    assert got["cuda:0"] == {"requests": 11, "swapped": 10, "compute_s": 0.022, "p90_queue_ms": 8.0}
    assert got["cuda:1"] == {"requests": 1, "swapped": 0, "compute_s": 0.002, "p90_queue_ms": 1.0}
    point = {"n": 800, "attainment": 0.9, "p50_ms": 6.0, "p99_ms": 30.0, "throughput_rps": 100.0, "swaps_per_s": 30.0,
             "busy_fraction": 0.2, "requests": 13, "status_codes": {"200": 12, "503": 1}, "by_device": got}
    text = report_trace.table({"gpu": "H200", "gpus": 2, "policies": {"swapserve": {"max_functions": 0,
                                                                                  "sweep": [point]}}})
    assert "| swapserve | 800 | cuda:0 | 11 | 10 | 0.02 | 8.00 |" in text
    assert "Where answered requests ran" not in report_trace.table(
        {"gpu": "H200", "gpus": 1, "policies": {"swapserve": {"max_functions": 0, "sweep": [
            {**point, "by_device": {"cuda:0": got["cuda:0"]}}]}}})  # one device: nothing to compare


def test_points_whose_models_exceed_host_memory_are_not_run(trace_module):
    fns = trace_module.make_functions(6, ["a", "b"], {"a": 10.0, "b": 20.0}, seed=0)  # a, b, a, b, a, b
    sizes = {"a": 1 << 30, "b": 3 << 30}
    need = {n: trace_module.host_store_bytes(sum(sizes[f.model] for f in fns[:n])) for n in (2, 4, 6)}
    assert need[2] >= 4 << 30 and need[2] < need[4] < need[6]
    fits, host = trace_module.fit_host([2, 4, 6], fns, sizes, room=need[4])
    assert fits == [2, 4] and host["not_run"] == [6]
    assert host["available_bytes"] == need[4] and host["needed_bytes"]["6"] == need[6]
    assert trace_module.fit_host([2, 4, 6], fns, sizes, room=need[2] - 1)[0] == []
    assert trace_module.host_room() > 0  # this machine's: its shared memory and available memory


def test_the_table_says_which_points_host_memory_left_out(trace_module):
    import report_trace

    base = {"gpu": "H200", "gpus": 1, "policies": {}}
    assert "Not run" not in report_trace.table({**base, "host_memory": {"available_bytes": 9e9, "needed_bytes": {
        "100": 5e9}, "not_run": []}})
    said = report_trace.table({**base, "host_memory": {"available_bytes": 117.2e9, "needed_bytes": {
        "400": 99.1e9, "500": 123.6e9}, "not_run": [500]}})
    assert ("Not run, for host memory (every model stays in page-locked host memory): N=500 (a host store of "
            "123.6 GB); this machine had room for 117.2 GB.") in said


def test_the_table_names_the_settings_that_differ_from_the_defaults(trace_module):
    import report_trace

    base = {"gpu": "H200", "gpus": 1, "policies": {}}
    assert "Node:" not in report_trace.table(base)  # a result that records no settings
    assert "Node:" not in report_trace.table({**base, "side_fetch": True, "place_ahead": True,
                                              "gateway_margin": True})
    said = report_trace.table({**base, "side_fetch": False, "place_ahead": False, "gateway_margin": False})
    assert "Node: side fetches off, placing ahead off, the gateway's margin off." in said
    assert "Node: the controller polling 1 ms." in report_trace.table({**base, "spin_ms": 1.0})
    assert "Node: the controller not polling." in report_trace.table({**base, "spin_ms": 0.0})
    assert "Node: eviction values in shares of SLOs." in report_trace.table({**base, "slo_values": True})
    assert "Node:" not in report_trace.table({**base, "slo_values": False})


def test_the_table_says_how_fast_the_node_copied_beside_the_slos_floors(trace_module, tmp_path):
    """Lent machines of one card differ in their host link: the SLO table's source names the bandwidth its floors
    were measured at, and the table the bandwidth this node measured."""
    import json

    import report_trace

    base = {"gpu": "H200", "gpus": 1, "policies": {}}
    assert "link measured" not in report_trace.table(base)  # results before the link was recorded
    said = report_trace.table({**base, "link_profile": {"h2d_GBps": 41.87, "exec_slowdown_copying": 1.07}})
    assert "The node's host→GPU link measured 41.9 GB/s at its start (its first GPU)." in said
    row = {"model": "resnet50", "dtype": "float16", "native_graph_ms": 1.0, "floor_ms": 2.0}
    source = tmp_path / "swap_latency.json"
    source.write_text(json.dumps({"h2d_pinned_GBps": 55.15, "models": [row]}))
    slo, said = trace_module.slo_table(["resnet50"], source)
    assert slo == {"resnet50": 10.0} and said == f"{source} (its floors at pinned H2D 55.1 GB/s)"
    source.write_text(json.dumps({"models": [{**row, "native_graph_ms": 2.0}]}))  # a table that names no bandwidth
    assert trace_module.slo_table(["resnet50"], source) == ({"resnet50": 12.0}, str(source))


def test_paired_compares_each_request_with_itself_in_the_other_trace(trace_module, tmp_path):
    import json
    import subprocess

    import paired  # bench/paired.py, on the path with trace.py

    def write(d, replays, suffix):  # a replay is matched by its name whatever its compression (xz since session 29)
        (d / "trace_raw").mkdir(parents=True)
        (d / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0, "gpt2": 50.0}}))
        for i, records in enumerate(replays):
            with trace_module.open_raw(d / "trace_raw" / f"swapserve_3_r{i}{suffix}", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def rec(fn, at, latency, compute=1.0, status=200):
        return {"function": fn, "at_s": at, "latency_ms": latency, "compute_ms": compute, "status": status}

    lat = [4.0 + 0.5 * i for i in range(13)]  # 4.0 .. 10.0 ms
    a = [[rec(f"f{i % 3}-small", 0.1 * i, x) for i, x in enumerate(lat)] + [rec("f9-gpt2", 5.0, 30.0)]]
    # B: every request 0.5 ms sooner outside its run, the last one of f0 refused, the GPT-2 one left out.
    b = [[rec(f"f{i % 3}-small", 0.1 * i + 0.01, x - 0.5, status=503 if i == 12 else 200)
          for i, x in enumerate(lat)] + [rec("f9-gpt2", 5.0, 99.0)] + [rec("f5-small", 0.0, 1.0)]]  # f5: not in A
    write(tmp_path / "a", a, ".jsonl.gz")
    write(tmp_path / "b", b, ".jsonl.xz")
    got = paired.compare(tmp_path / "a", tmp_path / "b", {"gpt2"}, resamples=200)
    assert (got["pairs"], got["answered"]) == (13, 12)  # f5's request has no partner, f0's 5th was refused in B
    assert got["measures"]["latency"]["median"] == pytest.approx(-0.5)
    assert got["measures"]["outside the run"]["low"] == pytest.approx(-0.5)  # every pair moved alike
    assert got["measures"]["the run"]["median"] == 0.0
    # 10.0 ms met the SLO in A and was refused in B.
    assert got["in_slo"] | {"p": 0} == {"a": 13, "b": 12, "only_a": 1, "only_b": 0, "p": 0}
    assert got["by_replay"]["swapserve_3_r0"]["in_slo"]["only_a"] == 1  # the one replay, on its own
    assert paired.sign_test(1, 0) == 1.0 and paired.sign_test(0, 10) == pytest.approx(2 / 1024)
    out = subprocess.run([sys.executable, str(BENCH / "paired.py"), str(tmp_path / "a"), str(tmp_path / "b"),
                          "--exclude", "gpt2", "--resamples", "100"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "| latency | -0.500 |" in out and "in A's only 1, in B's only 0" in out
    assert "| swapserve_3_r0 | 13 | -0.500 [-0.500, -0.500] | 1 | 0 |" in out


def test_an_alternating_ab_is_reported_request_by_request(trace_module, tmp_path):
    import gzip
    import json

    dirs = [tmp_path / "side_fetch_true", tmp_path / "side_fetch_false"]
    for d, shift in zip(dirs, (0.0, 1.0)):
        (d / "trace_raw").mkdir(parents=True)
        (d / "trace.json").write_text(json.dumps({"slo_ms": {"small": 10.0}}))
        with gzip.open(d / "trace_raw" / "swapserve_2_r0.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"function": f"f{i}-small", "at_s": i, "latency_ms": 5.0 + shift,
                                     "compute_ms": 1.0, "status": 200}) + "\n" for i in range(4))
    text = trace_module.paired_report("side_fetch=true,false", dirs, tmp_path)
    assert (tmp_path / "paired.md").read_text() == text + "\n"
    assert text.startswith("# side_fetch=true,false: request by request")
    assert "| latency | +1.000 |" in text and "| swapserve_2_r0 | 4 |" in text


def test_breakdown_names_each_part_by_its_place_in_a_result(trace_module):
    """A replay's result tuples (as ``run_point`` gathers them, in ``RAW_FIELDS`` order but the function's
    index first) give ``breakdown`` its medians, each from its own field."""
    fields = ("index",) + trace_module.RAW_FIELDS[1:]
    value = {"latency_ms": 9.0, "headers_ms": 8.0, "server_ms": 7.0, "node_ms": 6.0, "queue_ms": 0.5,
             "dispatch_ms": 0.4, "decide_ms": 0.1, "to_worker_ms": 0.2, "worker_ms": 4.0, "from_worker_ms": 0.3,
             "compute_ms": 3.5, "swapped": True}
    rows = [tuple(value.get(f, 0) for f in fields)] * 3
    b = trace_module.breakdown(rows)
    assert {k: b[k] for k in value if k != "swapped"} == {k: v for k, v in value.items() if k != "swapped"}
    assert (b["requests"], b["swapped_fraction"]) == (3, 1.0)


def test_the_node_s_run_log_is_read_with_the_token_and_moved_to_the_bench_s_clock(trace_module):
    """The node's clock here runs 1000 s ahead of the bench's: a run that ended 0.25 s before the node answered
    comes back 0.25 s before the bench asked, and ``since`` goes to the node on its own clock."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace
    from urllib.parse import parse_qs, urlparse

    asked: list[tuple[float, str]] = []

    class Node(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            now = time.perf_counter() + 1000.0
            query = parse_qs(url.query)
            since = float(query["since"][0]) if "since" in query else None
            asked.append((since, self.headers["Authorization"]))
            runs = [] if since is None else [[now - 0.5, now - 0.25, "cuda:0", 0, "f", "piece"]]  # the clock alone
            stalls = [] if since is None else [[now - 0.2, now - 0.197, "loop", 2.9]]
            body = json.dumps({"now": now, "fields": ["begun", "ended", "device", "lane", "function", "kind"],
                               "runs": runs, "stall_fields": ["begun", "ended", "what", "cpu_ms"],
                               "stalls": stalls}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        srv = SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", token="t0k")
        since = time.perf_counter() - 5.0
        before = time.perf_counter()
        runs, stalls = trace_module.lane_runs(srv, since)
        after = time.perf_counter()
    finally:
        server.shutdown()
    assert [a for _, a in asked] == ["Bearer t0k"] * 2
    assert asked[1][0] == pytest.approx(since + 1000.0, abs=after - before)
    (run,) = runs
    assert (run["device"], run["kind"]) == ("cuda:0", "piece")
    assert before - 0.25 - (after - before) <= run["ended"] <= after - 0.25
    assert run["ended"] - run["begun"] == pytest.approx(0.25)
    (stall,) = stalls  # the controller's, moved the same way
    assert stall["what"] == "loop" and before - 0.197 - (after - before) <= stall["ended"] <= after - 0.197


def test_profiles_find_py_spy_beside_the_interpreter_when_it_is_not_on_the_path(trace_module, tmp_path, monkeypatch):
    """A virtual environment used without activating it (``.venv/bin/python bench/trace.py --profile``) has py-spy
    beside its interpreter, not on the PATH: the samplers start from there."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    spy = bindir / "py-spy"
    spy.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho "sampled" > "$2"\n')
    spy.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    class Srv:
        proc = type("Proc", (), {"pid": 12345})()

        @staticmethod
        def front_pids() -> list[int]:
            return []

    spies = trace_module.start_profiles(Srv(), tmp_path / "profiles" / "swapserve_10", 1)
    assert [out.name for _, out in spies] == ["swapserve_10_controller.txt"]
    for proc, out in spies:
        assert proc.wait(timeout=10) == 0
        assert out.read_text() == "sampled\n"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / "python"))
    assert trace_module.start_profiles(Srv(), tmp_path / "profiles" / "swapserve_20", 1) == []  # none anywhere


def test_a_refusal_keeps_the_lateness_it_expected_and_the_table_reads_it(trace_module):
    """A 503 for a deadline says how late the scheduler expected the request; the record keeps it beside the
    blanked reason, and the table gives the refused requests' least, median and most, and those by 1 ms or less."""
    import json

    import report_trace

    said = json.dumps({"error": "function 'f1' cannot meet the deadline: expected 3.5 ms late"}).encode()
    assert trace_module._refusal(said) == ("function '…' cannot meet the deadline: expected # ms late", 3.5)
    assert trace_module._refusal(b'{"error": "node has 9 queued requests (max_queued)"}') == (
        "node has # queued requests (max_queued)", -1.0)
    assert trace_module._refusal(b"<html>bad gateway</html>") == ("<html>bad gateway</html>", -1.0)
    assert trace_module.RAW_FIELDS[-1] == "late_ms"

    point = {"n": 400, "attainment": 0.9, "p50_ms": 6.0, "p99_ms": 30.0, "throughput_rps": 100.0,
             "swaps_per_s": 30.0, "busy_fraction": 0.2, "requests": 13, "status_codes": {"200": 8, "503": 5}}

    def table(late: list[float]) -> str:
        return report_trace.table({"gpu": "H200", "gpus": 1, "policies": {"swapserve": {
            "max_functions": 0, "sweep": [{**point, "refused_late_ms": late}]}}})

    assert "Refusals:" not in table([])
    text = table([0.2, 0.9, 4.0, 12.5, 30.0])
    assert "| swapserve | 400 | 5 | 0.2 | 4.0 | 30.0 | 2 |" in text
