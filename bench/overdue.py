"""How long a lane still takes once it is past its expected end, from the node's run log (``trace_raw/runs/``,
``bench/trace.py --raw`` since session 30): for each kind of work (pieces of swaps, swapped runs, resident runs,
prefetches) and each overdue time, of the dispatches still unanswered that long after their expected end
(from the lane taking them up, ``begun``, plus ``expected_ms``), how many, and the median and mean of the time
they took beyond it. This is what the planning view's rule for an overdue lane (``estimate._late``) should
match: a lane overdue by ``o`` is planned to free ``max(0, o − LATE_GRACE_S)`` after now.

Then the controller's stalls (``trace_raw/stalls/``, since session 31): how many turns of its loop and
collections held it ``STALL_MS`` or more, their length and how much of it was the controller's own CPU.

    python bench/overdue.py TRACE_DIR [TRACE_DIR ...] [--overdue-ms 0.25 0.5 1 2 4 8]

Prints a markdown table per replay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import RUNS_DIR, STALLS_DIR, raw_tag, read_runs  # noqa: E402  (bench/trace.py)

KINDS = ("piece", "swapped run", "resident run", "prefetch")
MIN_COUNT = 5
"""Fewer dispatches than this overdue that long: no medians."""


def kind(run: dict) -> str:
    """Which of :data:`KINDS` a run-log record is."""
    if run["kind"] == "run":
        return "swapped run" if run["swapped"] else "resident run"
    return run["kind"]


def past_expected_ms(run: dict) -> float:
    """How long after its expected end a dispatch was answered (negative: before)."""
    return (run["ended_s"] - run["begun_s"]) * 1e3 - run["expected_ms"]


def remaining(runs: list[dict], overdue_ms: list[float]) -> list[tuple]:
    """Rows ``(kind, dispatches, overdue ms, still unanswered, median ms more, mean ms more)``: of each kind's
    dispatches, those still unanswered ``o`` ms past their expected end and what they took beyond that."""
    out = []
    for k in KINDS:
        late = [past_expected_ms(r) for r in runs if kind(r) == k]
        if not late:
            continue
        for o in overdue_ms:
            more = [x - o for x in late if x > o]
            if len(more) >= MIN_COUNT:
                out.append((k, len(late), o, len(more), statistics.median(more), statistics.mean(more)))
            else:
                out.append((k, len(late), o, len(more), None, None))
    return out


def stall_summary(stalls: list[dict]) -> list[tuple]:
    """Rows ``(what, count, median ms, longest ms, total ms, CPU share)`` of the controller's stalls: turns of its
    loop (``loop``) and collections (``gc``)."""
    out = []
    for what in ("loop", "gc"):
        xs = [s for s in stalls if s["what"].split()[0] == what]
        if not xs:
            continue
        ms = [(s["ended_s"] - s["begun_s"]) * 1e3 for s in xs]
        cpu = sum(s["cpu_ms"] for s in xs)
        out.append((what, len(xs), statistics.median(ms), max(ms), sum(ms), cpu / sum(ms) if sum(ms) else 0.0))
    return out


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def report(directory: Path, overdue_ms: list[float]) -> str:
    """The markdown of every replay in ``directory`` with a run log."""
    parts = []
    for tag in sorted({raw_tag(f.name) for f in (directory / "trace_raw" / RUNS_DIR).glob("*.jsonl.*")}):
        runs = read_runs(directory, tag)
        if runs is None:  # not a raw file's suffix
            continue
        lines = [f"## {directory} {tag}: time past the expected end, once overdue", "",
                 "| work | dispatches | overdue ms | still unanswered | median ms more | mean ms more |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {n} | {o:g} | {m} | {_cell(med)} | {_cell(mean)} |"
                  for k, n, o, m, med, mean in remaining(runs, overdue_ms)]
        stalls = read_runs(directory, tag, STALLS_DIR)
        if stalls is not None:
            lines += ["", f"The controller's stalls ({tag}):", "",
                      "| what | count | median ms | longest ms | total ms | its own CPU |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {w} | {n} | {med:.2f} | {mx:.2f} | {tot:.0f} | {share:.0%} |"
                      for w, n, med, mx, tot, share in stall_summary(stalls)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else f"{directory}: no run log (trace_raw/{RUNS_DIR}/)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="directories holding trace_raw/")
    ap.add_argument("--overdue-ms", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    args = ap.parse_args()
    print("\n\n".join(report(d, args.overdue_ms) for d in args.traces))


if __name__ == "__main__":
    main()
