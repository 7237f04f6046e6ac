"""What each lane of each GPU ran around a late request: the answered requests of one replay whose trace time
falls in a window, per device and lane in the order they were sent to it, with when each came, was sent to its
lane and was answered, and the times that say why (queue, worker, run, expected, the node's budget, the copy the
dispatch planned). Refused requests are listed apart. From the raw records of ``bench/trace.py --raw``.

    python bench/timeline.py TRACE_DIR --from 6.05 --to 6.16 [--replay swapserve_800] [--lane 0]

Times are ms of the trace's clock (``at_s``; a request's dispatch is ``at + queue``, its end ``at + latency``, as
the client saw it). Pieces of a swap and prefetches carry no request: where the trace recorded the node's run log
(``trace_raw/runs/``, since session 30) a second table lists everything each lane ran in the window, pieces and
prefetches included, from when its lane took it up to its answer on the node. Without it (older traces) a first
lane with queued work and nothing listed was most likely copying a piece: session 30 read the BERT-large misses
of its A/B so (``bench/results/h200x2_20261130/session30/README.md``). Where the trace recorded the controller's
stalls (``trace_raw/stalls/``, since session 31: turns of its event loop and collections that held it 1 ms or
more), those in the window are listed last, with the controller's CPU time in each (near its length: its own work
held it; far below: it was not running): every reply and request waited them out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import STALLS_DIR, read_raw, read_runs  # noqa: E402  (bench/trace.py)

COLUMNS = ("device", "lane", "function", "at", "sent", "ends", "latency", "queue", "worker", "run", "expected",
           "budget", "copy")


def rows(records: list[dict], start_s: float, end_s: float, lane: int | None = None) -> list[tuple]:
    """The answered requests that came in ``[start_s, end_s)`` (of ``lane`` only, if given), as rows of
    :data:`COLUMNS`, by device, lane and the time each was sent to its lane."""
    out = []
    for r in records:
        if r["status"] != 200 or not start_s <= r["at_s"] < end_s or (lane is not None and r["lane"] != lane):
            continue
        at = r["at_s"] * 1e3
        out.append((r["device"], r["lane"], r["function"], at, at + r["queue_ms"], at + r["latency_ms"],
                    r["latency_ms"], r["queue_ms"], r["worker_ms"], r["compute_ms"], r.get("expected_ms", -1.0),
                    r.get("budget_ms", -1.0), r.get("copy_ms", -1.0)))
    return sorted(out, key=lambda x: (x[0], x[1], x[4], x[3]))


def refused(records: list[dict], start_s: float, end_s: float) -> list[tuple[float, str, int, str]]:
    """(at ms, function, status, reason) of the requests in the window that got no answer."""
    return sorted((r["at_s"] * 1e3, r["function"], r["status"], r.get("reason", "")) for r in records
                  if r["status"] != 200 and start_s <= r["at_s"] < end_s)


RUN_COLUMNS = ("device", "lane", "function", "kind", "begun", "ended", "requests", "source", "swapped", "MB copied",
               "run", "expected")


def lane_rows(runs: list[dict], start_s: float, end_s: float, lane: int | None = None) -> list[tuple]:
    """What the lanes ran (the node's run log) overlapping ``[start_s, end_s)``, as rows of :data:`RUN_COLUMNS`,
    by device, lane and start."""
    out = [(r["device"], r["lane"], r["function"], r["kind"],
            r["begun_s"] * 1e3, r["ended_s"] * 1e3, r["requests"], r["source"], r["swapped"],
            r["bytes_copied"] / 1e6, r["wall_ms"], r["expected_ms"])
           for r in runs if r["ended_s"] >= start_s and r["begun_s"] < end_s and (lane is None or r["lane"] == lane)]
    return sorted(out, key=lambda x: (x[0], x[1], x[4]))


def run_table(lines: list[tuple]) -> str:
    out = ["| " + " | ".join(RUN_COLUMNS) + " |", "|---|---:|---|---|" + "---:|" * 3 + "---|---|" + "---:|" * 3]
    for x in lines:
        out.append("| " + " | ".join([x[0], str(x[1]), x[2], x[3], f"{x[4]:.1f}", f"{x[5]:.1f}", str(x[6]), x[7],
                                      "yes" if x[8] else "", f"{x[9]:.0f}", f"{x[10]:.1f}", f"{x[11]:.1f}"]) + " |")
    return "\n".join(out)


def table(lines: list[tuple]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---|" + "---:|" * (len(COLUMNS) - 3)]
    for x in lines:
        out.append("| " + " | ".join([x[0], str(x[1]), x[2], *(f"{v:.1f}" for v in x[3:])]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="a directory holding trace_raw/")
    ap.add_argument("--from", dest="start", type=float, required=True, help="trace time (s)")
    ap.add_argument("--to", dest="end", type=float, required=True, help="trace time (s)")
    ap.add_argument("--replay", help="which replay (e.g. swapserve_800); needed when the directory holds several")
    ap.add_argument("--lane", type=int, help="this lane only (0: the first lane, which swaps)")
    args = ap.parse_args()
    replays = read_raw(args.trace)
    if args.replay is None and len(replays) != 1:
        ap.error(f"{args.trace} holds {len(replays)} replays ({', '.join(sorted(replays))}): name one with --replay")
    tag = args.replay or next(iter(replays))
    if tag not in replays:
        ap.error(f"no replay {tag!r} in {args.trace} (it holds {', '.join(sorted(replays))})")
    records = replays[tag]
    print(table(rows(records, args.start, args.end, args.lane)))
    if lost := refused(records, args.start, args.end):
        print()
        for at, function, status, reason in lost:
            print(f"- {at:.1f} {function}: {status} {reason}")
    if (runs := read_runs(args.trace, tag)) is not None:
        print()
        print(f"What the lanes ran ({tag}, the node's run log):")
        print()
        print(run_table(lane_rows(runs, args.start, args.end, args.lane)))
    if (stalls := read_runs(args.trace, tag, STALLS_DIR)) is not None:
        held = [x for x in stalls if x["ended_s"] >= args.start and x["begun_s"] < args.end]
        print()
        print(f"The controller's stalls ({tag}): {len(held) or 'none'}")
        for x in held:
            print(f"- {x['begun_s'] * 1e3:.1f} to {x['ended_s'] * 1e3:.1f}: {x['what']}, "
                  f"{(x['ended_s'] - x['begun_s']) * 1e3:.1f} ms, of its CPU {x['cpu_ms']:.1f} ms")


if __name__ == "__main__":
    main()
