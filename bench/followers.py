"""How a burst's followers fared against their leaders, from the raw per-request records of ``bench/trace.py
--raw``: for every request that came within ``--within-ms`` (default 1) of the one before of its function (both
answered), how much later it finished than that one (its latency plus the gap, minus the leader's latency) —
split by whether the leader swapped — and how many of them missed their SLO.

A comparison inside one replay: whatever slows a whole replay (the machine, the order of replays) slows the
leader and its follower alike, where replays of two codes side by side differ by a millisecond for every
request. A follower that joins its leader's batch finishes with it (~0 ms); one run apart finishes after the
leader's run, swap included.

    python bench/followers.py bench/results/<gpu>_<date>/.../trace.json [more trace.json ...]

Prints a markdown table, one row per raw file beside each trace.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import percentile  # noqa: E402  (bench/stats.py)
from trace import model_of, read_raw  # noqa: E402  (bench/trace.py)


def finish_after_leader(records: list[dict], slo_ms: dict[str, float], within_ms: float) -> dict[str, dict]:
    """By the leader's kind (``swapped``, ``resident``): the followers' finish after their leader (ms: n,
    median, p90) and how many were late."""
    by_fn: dict[str, list[dict]] = {}
    for r in records:
        by_fn.setdefault(r["function"], []).append(r)
    after: dict[str, list[float]] = {"swapped": [], "resident": []}
    late = {"swapped": 0, "resident": 0}
    for fn, rs in by_fn.items():
        rs.sort(key=lambda r: r["at_s"])
        for lead, r in zip(rs, rs[1:]):
            gap_ms = (r["at_s"] - lead["at_s"]) * 1e3
            if gap_ms >= within_ms or not lead["status"] == r["status"] == 200:
                continue
            kind = "swapped" if lead["swapped"] else "resident"
            after[kind].append(r["latency_ms"] + gap_ms - lead["latency_ms"])
            late[kind] += r["latency_ms"] > slo_ms[model_of(fn)]
    return {k: {"n": len(v), "median_ms": statistics.median(v) if v else None,
                "p90_ms": percentile(v, 90) if v else None, "late": late[k]} for k, v in after.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="trace.json files (raw records in trace_raw/ beside)")
    ap.add_argument("--within-ms", type=float, default=1.0, help="a follower's largest gap to its leader")
    args = ap.parse_args()
    print("| replay | leader | followers | finish after the leader, median (ms) | p90 | late |")
    print("|---|---|---:|---:|---:|---:|")
    for t in args.traces:
        slo = json.loads(t.read_text())["slo_ms"]
        for name, records in read_raw(t.parent).items():
            for kind, s in finish_after_leader(records, slo, args.within_ms).items():
                if s["n"]:
                    print(f"| {t.parent.name}/{name} | {kind} | {s['n']} | "
                          f"{s['median_ms']:+.2f} | {s['p90_ms']:+.2f} | {s['late']} |")


if __name__ == "__main__":
    main()
