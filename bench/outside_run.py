"""How long answered requests spent outside their run, trace against trace: from the raw records of
``bench/trace.py --raw``, for resident and for swapped requests, the medians of latency − the worker's run
(``compute_ms``) and of the parts of it :func:`trace.request_parts` names (client side, gateway, controller,
queue, dispatch, pipes), every replay of a trace directory pooled — for comparing two codes or settings run on
the same machine, where attainment alone moves by whole functions.

    python bench/outside_run.py TRACE_DIR [TRACE_DIR ...] [--exclude gpt2-medium]

Prints one markdown row per directory and kind of request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import model_of, read_raw, request_parts  # noqa: E402  (bench/trace.py)

PARTS = ("client", "read", "gateway", "controller", "queue", "dispatch", "pipes")


def answered(directory: Path, exclude: set[str]) -> list[dict]:
    """Every answered request of every replay in ``directory/trace_raw``, less the excluded zoo models."""
    return [r for records in read_raw(directory).values() for r in records
            if r["status"] == 200 and model_of(r["function"]) not in exclude]


def row(label: str, records: list[dict]) -> str:
    med = {"outside": statistics.median(r["latency_ms"] - r["compute_ms"] for r in records)}
    parts = [request_parts(r) for r in records]
    med.update({k: statistics.median(p[k] for p in parts) for k in PARTS})
    return f"| {label} | {len(records)} | " + " | ".join(f"{med[k]:.2f}" for k in ("outside", *PARTS)) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="directories holding trace_raw/")
    ap.add_argument("--exclude", default="", help="zoo models to leave out, comma-separated")
    args = ap.parse_args()
    exclude = {m for m in args.exclude.split(",") if m}
    print("| trace, requests | answered | outside the run | " + " | ".join(PARTS) + " |")
    print("|---|---:|" + "---:|" * (1 + len(PARTS)))
    for d in args.traces:
        records = answered(d, exclude)
        for kind, swapped in (("resident", False), ("swapped", True)):
            mine = [r for r in records if r["swapped"] == swapped]
            if mine:
                print(row(f"{d}, {kind}", mine))


if __name__ == "__main__":
    main()
