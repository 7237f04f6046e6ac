"""Which functions miss their SLO in replay after replay of one trace, from the raw per-request records of
``bench/trace.py --raw``: every replay of the same point (same N, same seed: the same requests at the same
times) pooled, each missing function (P98 over its SLO) with how many replays it missed in, when its worst
request was sent in each, and that request's largest part (``trace.worst_part``).

A function that misses in every replay at the same second is the trace's, not the replay's: a burst the node
cannot serve in time by the way it orders and places work, which no rerun will change and a change of policy
might. One that misses once is the replay's (a slower moment of the machine, a stall). On one H200 at N = 400
(session 18, five replays) one vgg19 function missed in all five, 19.0 s in.

    python bench/repeat_misses.py --n 400 bench/results/<gpu>_<date>/trace.json [more trace.json ...]

Prints a markdown table, the functions missing in most replays first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import model_of, read_raw, worst_part, worst_requests  # noqa: E402  (bench/trace.py)


def misses(records: list[dict], slo_ms: dict[str, float]) -> dict[str, tuple[float, str]]:
    """Each function whose P98 is over its model's SLO (``slo_ms`` by model): when its worst request was sent
    (s into the measured window) and that request's largest part."""
    by_fn: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_fn[r["function"]].append(r)
    worst = worst_requests(by_fn, {fn: slo_ms[model_of(fn)] for fn in by_fn})
    return {fn: (r["at_s"], worst_part(r)) for fn, r in worst.items()}


def pooled(replays: list[dict[str, tuple[float, str]]]) -> list[tuple[str, list[tuple[float, str]]]]:
    """Each function missing in any replay, with its (sent at, part) in each replay it missed in; those
    missing in most replays first, then by name."""
    by_fn: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for rep in replays:
        for fn, miss in rep.items():
            by_fn[fn].append(miss)
    return sorted(by_fn.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="trace.json files (raw records in trace_raw/ beside)")
    ap.add_argument("--n", type=int, required=True, help="the point (number of functions) to pool")
    ap.add_argument("--policy", default="swapserve")
    args = ap.parse_args()
    replays, names = [], []
    for t in args.traces:
        slo = json.loads(t.read_text())["slo_ms"]
        for name, records in read_raw(t.parent).items():
            if name == f"{args.policy}_{args.n}" or name.startswith(f"{args.policy}_{args.n}_r"):
                replays.append(misses(records, slo))
                names.append(f"{t.parent.name}/{name}")
    if not replays:
        raise SystemExit(f"no raw records of {args.policy} at N={args.n} beside {[str(t) for t in args.traces]}")
    print(f"{len(replays)} replays of {args.policy} at N = {args.n}: {', '.join(names)}; missing functions per "
          f"replay: {', '.join(str(len(r)) for r in replays)}\n")
    print("| function | replays missed | worst request sent at (s) | its largest part |")
    print("|---|---:|---|---|")
    for fn, ms in pooled(replays):
        print(f"| {fn} | {len(ms)} of {len(replays)} | {', '.join(f'{at:.2f}' for at, _ in ms)} "
              f"| {', '.join(part for _, part in ms)} |")


if __name__ == "__main__":
    main()
