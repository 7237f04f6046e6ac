"""How long swapped runs spent remapping their slots, trace against trace: from the raw records of
``bench/trace.py --raw``, every replay of a trace directory pooled, the wall time of the ``place_remap`` phase
(the driver's unmaps, maps and access grants of the slots a placement moved) and the CPU time of it, and the
remaps over ``--over`` ms (the driver stalling, or the calls waiting on each other) with when they came — for
comparing codes or settings that change how pages are mapped.

    python bench/remap_phases.py TRACE_DIR [TRACE_DIR ...] [--over 2]

Prints one markdown row per directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import read_raw  # noqa: E402  (bench/trace.py)


def swapped_phases(directory: Path) -> list[tuple[float, dict]]:
    """(at_s, phases_ms) of every answered swapped run in every replay of ``directory/trace_raw``."""
    return [(r["at_s"], r["phases_ms"]) for records in read_raw(directory).values() for r in records
            if r["status"] == 200 and r.get("swapped") and r.get("phases_ms")]


def row(label: str, runs: list[tuple[float, dict]], over_ms: float) -> str:
    wall = [p.get("place_remap", 0.0) for _, p in runs]
    cpu = [p.get("place_remap_cpu", 0.0) for _, p in runs]
    slow = sorted(((p.get("place_remap", 0.0), at) for at, p in runs if p.get("place_remap", 0.0) > over_ms),
                  reverse=True)
    cuts = statistics.quantiles(wall, n=100) if len(wall) > 1 else wall * 99
    return (f"| {label} | {len(runs)} | {statistics.median(wall):.3f} | {statistics.mean(wall):.3f} | {cuts[98]:.3f} "
            f"| {statistics.mean(cpu):.3f} | {len(slow)} | "
            + ", ".join(f"{ms:.1f} at {at:.1f} s" for ms, at in slow[:5]) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="directories holding trace_raw/")
    ap.add_argument("--over", type=float, default=2.0, help="count the remaps longer than this (ms)")
    args = ap.parse_args()
    print(f"| trace | swapped runs | remap p50 ms | mean | p99 | CPU mean | over {args.over:g} ms | longest |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for d in args.traces:
        runs = swapped_phases(d)
        if runs:
            print(row(str(d), runs, args.over))


if __name__ == "__main__":
    main()
