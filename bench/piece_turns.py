"""What took a first lane's turn right after a piece of a swap, from the node's run log (``trace_raw/runs/``,
``bench/trace.py --raw`` since session 30) and the raw per-request records: of the pieces after which the lane
went on with another function's work at once (queued behind the piece: started within ``AT_ONCE_S`` of its end),
how many were due before the swap's waiting requests (what the scheduler lets go between pieces) and how many
after (what the swap's hold on the lane should have kept out), and after how many of them the swap's run went
to another device, its pieces' bytes left behind.

A request's due time here is the client's send time plus the node's budget for it (``at_s + budget_ms``): the
node's own deadline is its arrival plus that budget, a fraction of a millisecond later.

    python bench/piece_turns.py TRACE_DIR [TRACE_DIR ...]

Prints a markdown table, one row per replay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import read_raw, read_runs  # noqa: E402  (bench/trace.py)

AT_ONCE_S = 1e-4
"""Work that started this soon after a piece's end was queued behind it (a decision after the piece takes a
round trip through the controller, a few hundred µs)."""
MOVED_WITHIN_S = 0.2
"""The swap's run within this long after the piece counts as its continuation."""


def _due(records: list[dict], function: str, at: float, device: str | None = None) -> float | None:
    """The earliest due time of ``function``'s requests waiting at ``at`` (sent by then, answered after)."""
    due = [r["at_s"] + r["budget_ms"] / 1e3 for r in records
           if r["function"] == function and r["status"] == 200 and r["at_s"] <= at <= r["at_s"] + r["latency_ms"] / 1e3
           and (device is None or r.get("device") == device)]
    return min(due, default=None)


def piece_turns(runs: list[dict], records: list[dict]) -> dict[str, int]:
    lanes: dict[str, list[dict]] = {}
    for r in runs:
        if r["lane"] == 0:
            lanes.setdefault(r["device"], []).append(r)
    out = {"pieces": 0, "behind": 0, "due_before": 0, "due_after": 0, "unmatched": 0, "moved": 0}
    for device, rs in lanes.items():
        rs.sort(key=lambda r: r["begun_s"])
        for piece, nxt in zip(rs, rs[1:]):
            if piece["kind"] != "piece":
                continue
            out["pieces"] += 1
            if nxt["function"] == piece["function"] or nxt["begun_s"] - piece["ended_s"] >= AT_ONCE_S:
                continue
            out["behind"] += 1
            swap = _due(records, piece["function"], piece["ended_s"])
            other = _due(records, nxt["function"], nxt["begun_s"], device)
            if swap is None or other is None:
                out["unmatched"] += 1
            else:
                out["due_before" if other <= swap else "due_after"] += 1
            later = [r for r in runs if r["function"] == piece["function"] and r["kind"] == "run"
                     and 0 <= r["begun_s"] - piece["ended_s"] < MOVED_WITHIN_S]
            out["moved"] += bool(later) and min(later, key=lambda r: r["begun_s"])["device"] != device
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="trace directories (trace_raw/ with runs/ inside)")
    args = ap.parse_args()
    print("| replay | pieces | another's work behind one | of it due before the swap | due after | unmatched "
          "| the swap's run then on another device |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in args.traces:
        for tag, records in read_raw(t).items():
            runs = read_runs(t, tag)
            if runs is None:
                print(f"| {t.name} {tag} | (no run log) | | | | | |")
                continue
            c = piece_turns(runs, records)
            print(f"| {t.name} {tag} | {c['pieces']} | {c['behind']} | {c['due_before']} | {c['due_after']} "
                  f"| {c['unmatched']} | {c['moved']} |")


if __name__ == "__main__":
    main()
