"""Why functions missed their SLO in a trace run, from the raw per-request records of ``bench/trace.py --raw``:
for each function whose P98 is over its SLO, the largest part of its worst request (client side, gateway,
controller, queue, dispatch, pipes, lane, pages, swap, or a refusal), the medians of the parts outside the
worker, the attainment the run would have had with every request's queueing removed, and a burst's followers
(requests within 10 ms of the one before of their function: batched with it, or alone and then how many late;
``trace.burst_followers``) — ``trace.miss_causes``; runs since 2026-11-28 carry the same in trace.json, the
followers since 2026-11-29's thirteenth session.

    python bench/miss_causes.py bench/results/<gpu>_<date>/trace.json [raw.jsonl.xz ...] [--late]

``--late`` also lists every answered request over its SLO, in send order, with its model, latency, run and
parts (a markdown table per raw file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import miss_causes, model_of, raw_files, raw_tag, read_records, request_parts  # noqa: E402  (bench/trace.py)

OUTSIDE = ("client", "read", "gateway", "controller", "dispatch", "pipes")
"""The parts of a request's time outside the worker and its queues, whose medians are printed."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="trace.json (its SLO table)")
    ap.add_argument("raw", type=Path, nargs="*", help="raw files (default: every one beside trace.json)")
    ap.add_argument("--late", action="store_true", help="list every answered request over its SLO")
    args = ap.parse_args()
    slo = json.loads(args.trace.read_text())["slo_ms"]
    files = args.raw or raw_files(args.trace.parent)
    for f in files:
        records = read_records(f)
        got = miss_causes(records, {r["function"]: slo[model_of(r["function"])] for r in records})
        done = [request_parts(r) for r in records if r["status"] == 200]
        got["median_ms"] = {k: round(statistics.median(p[k] for p in done), 2) for k in OUTSIDE} if done else {}
        got["functions"] = len({r["function"] for r in records})
        print(raw_tag(f.name), json.dumps(got))
        if args.late:
            print(late_table(records, slo))


def late_table(records: list[dict], slo: dict[str, float]) -> str:
    """Every answered request over its model's SLO, in send order: when it was sent, its model, latency, SLO,
    run (``compute_ms``) and :func:`request_parts`."""
    parts = ("client", "read", "gateway", "controller", "queue", "dispatch", "pipes", "lane", "place", "swap")
    lines = ["| at s | model | latency ms | SLO ms | run ms | " + " | ".join(parts) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(parts)]
    for r in sorted(records, key=lambda r: r["at_s"]):
        model = model_of(r["function"])
        if r["status"] == 200 and r["latency_ms"] > slo[model]:
            p = request_parts(r)
            lines.append(f"| {r['at_s']:.2f} | {model} | {r['latency_ms']:.1f} | {slo[model]:.1f} | "
                         f"{r['compute_ms']:.1f} | " + " | ".join(f"{p[k]:.1f}" for k in parts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
