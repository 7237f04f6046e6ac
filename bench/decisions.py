"""Whether a change to the scheduler changes any of its decisions: the same seeded random work (arrivals in
bursts, runs ending, evictions by other swaps, on one to three devices with side lanes, refusing and serving
functions, several settings) driven through the scheduler of this tree and of ``--base`` (another tree's root,
e.g. ``.whl/base`` from ``bench/lease_prep.sh REV``), each in a process of its own with the same hash seed (sets
of names are iterated in hash order), and every admission's and decision's outcome compared line by line.

    python bench/decisions.py --base .whl/base [--steps 3000]

Prints how many outcomes were compared, or the first that differs, and exits 1 then. A refactoring meant to
change no verdict (session 37's cheaper decision, c60db31) is checked so before any GPU time is spent on it; a
change meant to alter decisions shows where it first does. ``--log`` prints this tree's outcomes instead.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 10**6
GB = 10**9
CASES = (  # (seed, devices, side lanes, late policies drawn from, Scheduler settings)
    (1, 1, 1, ("refuse",), {"swap_piece_ms": 0, "queue_ahead": True, "side_fetch": True}),
    (2, 2, 2, ("refuse", "serve"), {"swap_piece_ms": 0, "queue_ahead": True, "side_fetch": True}),
    (3, 2, 1, ("refuse",), {}),
    (4, 1, 1, ("refuse", "serve"), {"swap_piece_ms": 3.0, "queue_ahead": True}),
    (5, 3, 1, ("refuse",), {"side_fetch": True, "place_ahead": True}),
    (6, 2, 1, ("refuse",), {"policy": "fifo_lru"}),
)
HASH_SEED = "0"


def log(steps: int) -> None:
    """Every outcome of :data:`CASES` through this interpreter's ``swapserve`` (the tree on ``sys.path``), a line
    each."""
    from swapserve.scheduler import (DeviceState, FunctionQueue, LinkProfile, ModelProfile, NodeState, Request,
                                     Scheduler, SideLane)

    for seed, devices, side, late, settings in CASES:
        print("case", seed)
        rng = random.Random(seed)
        s = NodeState([DeviceState(i, 2 * GB) for i in range(devices)], {}, {},
                      LinkProfile(h2d_GBps=(25.0,) * devices, fetch_GBps=20.0, exec_slowdown_beside=(1.2, 1.4)))
        for d in s.devices:
            d.side = [SideLane() for _ in range(side)]
        names = [f"f{i:02d}" for i in range(14)]
        for name in names:
            s.profiles[name] = ModelProfile(rng.choice((40 * MB, 170 * MB, 700 * MB)),
                                            {1: rng.uniform(0.5, 4.0), 4: rng.uniform(4.0, 9.0)}, 0.3)
            s.queues[name] = FunctionQueue(name, rng.choice((6.0, 12.0, 20.0, 45.0)), 4, 64, rng.choice(late))
        sch = Scheduler(**settings)
        now, running = 1000.0, []
        for step in range(steps):
            now += rng.uniform(0.0, 0.004)
            op = rng.random()
            if op < 0.5:  # a burst of one to three requests of one function
                name = rng.choice(names)
                for k in range(rng.choice((1, 1, 2, 3))):
                    r = Request(f"r{step}.{k}", name, now, now + s.queues[name].slo_ms / 1000.0, rng.choice((1, 1, 2)))
                    print("admit", step, k, sch.admit(s, r, now))
            elif op < 0.85 and running:  # a run ends; its reply may bring the model whole, or a part of it
                device, lane, name, whole = running.pop(rng.randrange(len(running)))
                s.devices[device].release(lane, now)
                if whole or rng.random() < 0.2:
                    s.devices[device].resident.add(name)
                    s.devices[device].partial.pop(name, None)
                elif rng.random() < 0.5:
                    s.devices[device].partial[name] = rng.random()
            else:  # another swap took a model's pages (never one a lane runs)
                d = rng.choice(s.devices)
                gone = sorted(f for f in d.resident if f not in (*d.first_lane, *d.side_running))
                if gone:
                    d.resident.discard(rng.choice(gone))
            decision = sch.decide(s, now)
            print("decide", step, decision)
            sch.apply(s, decision, now)
            running += [(d.device, d.lane, d.function, d.source != "resident" or d.lane == 0)
                        for d in decision.dispatches]


def outcomes(tree: Path, steps: int) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": HASH_SEED, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--log", "--steps", str(steps)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="the other tree's root (holding swapserve/)")
    ap.add_argument("--steps", type=int, default=3000, help="steps of random work per case")
    ap.add_argument("--log", action="store_true", help="print this tree's outcomes")
    args = ap.parse_args()
    if args.log:
        log(args.steps)
        return
    if args.base is None or not (args.base / "swapserve" / "scheduler").is_dir():
        ap.error("--base must be a tree's root holding swapserve/scheduler/")
    mine, base = outcomes(ROOT, args.steps), outcomes(args.base.resolve(), args.steps)
    for i, (a, b) in enumerate(zip(mine, base)):
        if a != b:
            print(f"outcome {i + 1} differs\n  this tree: {a}\n  base:      {b}")
            sys.exit(1)
    if len(mine) != len(base):
        print(f"this tree gave {len(mine)} outcomes, base {len(base)}")
        sys.exit(1)
    dispatches = sum(line.count("Dispatch(") for line in mine)
    rejects = sum(line.count("Reject(") for line in mine)
    print(f"identical: {len(mine)} outcomes in {len(CASES)} cases ({dispatches} dispatches, {rejects} refusals)")


if __name__ == "__main__":
    main()
