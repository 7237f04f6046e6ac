"""Whether large answers hold up the node's loop, from the raw per-request records of ``bench/trace.py --raw``:
requests whose worker reply was read late by the controller (``from_worker_ms`` over ``--late-ms``), and how
many of them ended within ``--window-ms`` of the end of a large-output model's request (GPT-2's 12.9 MB of
logits) — against the same share for every answered request, what chance alone gives.

    python bench/late_replies.py TRACE_DIR [TRACE_DIR ...] [--model gpt2-medium] [--late-ms 2.5] [--window-ms 10]

Prints a markdown table, one row per raw file.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import model_of, read_raw  # noqa: E402  (bench/trace.py)


def near_large(records: list[dict], model: str, late_ms: float, window_ms: float) -> dict[str, int]:
    """Answered requests, those whose reply was read late, and of each how many ended within ``window_ms`` of
    the end of another request of ``model``."""
    done = [r for r in records if r["status"] == 200]
    ends = sorted(r["at_s"] + r["latency_ms"] / 1e3 for r in done if model_of(r["function"]) == model)

    def near(r: dict) -> bool:
        end = r["at_s"] + r["latency_ms"] / 1e3
        lo = bisect.bisect_left(ends, end - window_ms / 1e3)
        hi = bisect.bisect_right(ends, end + window_ms / 1e3)
        return hi - lo > (model_of(r["function"]) == model)  # another one than itself

    late = [r for r in done if r.get("from_worker_ms", -1.0) > late_ms]
    return {"answered": len(done), "answered_near": sum(map(near, done)),
            "late": len(late), "late_near": sum(map(near, late))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="directories holding trace_raw/")
    ap.add_argument("--model", default="gpt2-medium", help="the model whose answers are large")
    ap.add_argument("--late-ms", type=float, default=2.5, help="a reply read later than this is late")
    ap.add_argument("--window-ms", type=float, default=10.0, help="how near the end of a large answer")
    args = ap.parse_args()
    print(f"| replay | answered | near a {args.model} answer | replies read > {args.late_ms} ms late | "
          f"of them near a {args.model} answer |")
    print("|---|---:|---:|---:|---:|")
    for d in args.traces:
        for name, records in read_raw(d).items():
            n = near_large(records, args.model, args.late_ms, args.window_ms)
            share = lambda a, b: f"{a} ({a / b:.0%})" if b else "0"  # noqa: E731
            print(f"| {d.name}/{name} | {n['answered']} | "
                  f"{share(n['answered_near'], n['answered'])} | {n['late']} | {share(n['late_near'], n['late'])} |")


if __name__ == "__main__":
    main()
