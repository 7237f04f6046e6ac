"""CPU time of the scheduler's decision core per request on a node of many functions: admission, the decision
and the eviction values a swap carries — the part of a request's ``dispatch_ms`` that grows with the models a
device holds. Pure Python on a synthetic state (no GPU, no processes), so it runs anywhere:

    python bench/scheduler_cost.py [--devices 4] [--functions 1500] [--resident 60] [--partial 300]

Each device holds ``--resident`` whole models and ``--partial`` partly held ones (the remnants evictions leave);
requests arrive one at a time, ``--interval-ms`` apart, each admitted, decided and applied as the controller
does, its lane released before the next. Prints the medians (µs), and the 90th and 99th percentiles of the swaps'
decisions, and of the controller's computation of the eviction values between passes (``refresh``, off the
request path: ``Scheduler.refresh_values``, each call one slice, one turn of the controller's loop) — and with
``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapserve.scheduler import (  # noqa: E402
    DeviceState, FunctionQueue, LinkProfile, ModelProfile, NodeState, Request, Scheduler, SideLane,
)

MB = 10**6
GB = 10**9
SIZES_MB = (50, 120, 220, 330, 700, 250)
"""Model sizes drawn from (fp16 ResNet-50 to GPT-2 medium)."""


def node(devices: int, functions: int, resident: int, partial: int, seed: int) -> tuple[NodeState, list[str]]:
    rng = random.Random(seed)
    link = LinkProfile(h2d_GBps=(54.0,) * devices, d2d_GBps=210.0 if devices > 1 else None,
                       exec_slowdown_copying=1.01, fetch_GBps=20.0)
    state = NodeState([DeviceState(i, 16 * GB, side=[SideLane()]) for i in range(devices)], {}, {}, link)
    names = [f"f{i:04d}" for i in range(functions)]
    now = 0.0
    for name in names:
        state.profiles[name] = ModelProfile(rng.choice(SIZES_MB) * MB, {1: rng.uniform(1.0, 5.0)})
        q = FunctionQueue(name, rng.choice((10.0, 15.0, 44.0)), 1, 64)
        q.rate, q.last_arrival = 0.1, now - rng.uniform(0.0, 30.0)
        state.queues[name] = q
    for d in state.devices:
        for name in rng.sample(names, resident):
            d.resident.add(name)
            d.last_used[name] = now - rng.uniform(0.0, 20.0)
        for name in rng.sample(names, partial):
            if name not in d.resident:
                d.partial[name] = rng.random()
        held = sum(state.profiles[f].nbytes for f in d.resident) + sum(state.profiles[f].nbytes * x
                                                                       for f, x in d.partial.items())
        d.used_bytes = min(d.pool_bytes, int(held))  # full: a swap's tie between devices weighs evictions
    return state, names


def measure(state: NodeState, names: list[str], requests: int, peers: bool,
            interval_s: float = 1e-3) -> dict[str, float]:
    sched = Scheduler(swap_piece_ms=0, peer_copies=peers)
    parts: dict[str, list[float]] = {"admit": [], "decide": [], "apply": [], "decide_swaps": [], "refresh": []}
    for k in range(requests):
        now = k * interval_s
        q = state.queues[names[k % len(names)]]
        request = Request(f"r{k}", q.function, now, now + q.slo_ms / 1e3)
        t0 = time.perf_counter()
        sched.admit(state, request, now)
        t1 = time.perf_counter()
        decision = sched.decide(state, now)
        t2 = time.perf_counter()
        sched.apply(state, decision, now)
        t3 = time.perf_counter()
        more = True
        while more:  # as the controller does once the pass's dispatches are sent: a slice a turn of its loop
            t = time.perf_counter()
            more = sched.refresh_values(state, now)
            parts["refresh"].append(time.perf_counter() - t)
        parts["admit"].append(t1 - t0)
        parts["decide"].append(t2 - t1)
        parts["apply"].append(t3 - t2)
        if any(d.source != "resident" for d in decision.dispatches):
            parts["decide_swaps"].append(t2 - t1)
        for d in decision.dispatches:
            state.devices[d.device].release(d.lane, now)
        state.queues[q.function].requests.clear()  # refused or not dispatched: the next request starts clean
    out = {f"{k}_us": statistics.median(v) * 1e6 for k, v in parts.items() if v}
    if parts["decide_swaps"]:
        cuts = statistics.quantiles(parts["decide_swaps"], n=100)
        out["decide_swaps_p90_us"], out["decide_swaps_p99_us"] = cuts[89] * 1e6, cuts[98] * 1e6
    out["refresh_p99_us"] = statistics.quantiles(parts["refresh"], n=100)[98] * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--functions", type=int, default=1500)
    ap.add_argument("--resident", type=int, default=60, help="whole models per device")
    ap.add_argument("--partial", type=int, default=300, help="partly held models per device")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--interval-ms", type=float, default=1.0, help="between requests (the node's clock)")
    ap.add_argument("--peer-copies", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the medians here (JSON)")
    args = ap.parse_args()
    state, names = node(args.devices, args.functions, args.resident, args.partial, args.seed)
    result = {"devices": args.devices, "functions": args.functions, "resident": args.resident,
              "partial": args.partial, "peer_copies": args.peer_copies,
              "interval_ms": args.interval_ms,
              **measure(state, names, args.requests, args.peer_copies, args.interval_ms / 1e3)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
