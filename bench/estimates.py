"""How good the scheduler's cost model was in a trace: each run's time as the worker measured it (``compute_ms``:
its swap, if any, and execution) against what the scheduler expected when it dispatched it (``expected_ms``,
the response's parameter since 2026-11-29's thirteenth session), from the raw records of ``bench/trace.py
--raw``, by model and by resident or swapped, every replay of a trace directory pooled. The estimates decide
where a request runs and whether it is refused as too late to meet its deadline; a model whose runs take
longer than expected is placed and admitted too eagerly, one that takes less is refused needlessly.

    python bench/estimates.py TRACE_DIR [TRACE_DIR ...]

Prints one markdown row per model and kind of run: runs, the medians of the run and of the estimate, and the
10th, 50th and 90th percentiles of run / estimate; then the same for runs of one request against batches; then,
per replay, how far runs were from their estimates, as dispatched and with a correction learned per model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import percentile  # noqa: E402
from trace import model_of, read_raw  # noqa: E402  (bench/trace.py)


def runs(directory: Path) -> list[dict]:
    """One record per run of every replay in ``directory/trace_raw`` (:func:`replay_runs`)."""
    return [r for records in read_raw(directory).values() for r in replay_runs(records)]


def replay_runs(records: list[dict]) -> list[dict]:
    """One record per run (a batch's requests share their run: the same function, lane and run time) of a
    replay that reported its estimate, with ``requests``: how many it answered; in send order."""
    first: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r.get("at_s", 0.0)):  # stable: records without it keep their order
        key = (r["function"], r.get("lane"), r.get("compute_ms"))
        if r["status"] != 200 or r.get("expected_ms", -1.0) <= 0:
            continue
        if key in first:
            first[key]["requests"] += 1
        else:
            first[key] = r | {"requests": 1}
    return list(first.values())


LEARN = 0.2
"""Weight of a run in :func:`per_model`'s correction (the scheduler's ``EXEC_WEIGHT``)."""


def per_model(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """How far each run of a replay (in send order) was from its estimate, in ms — as dispatched, and with a
    correction learned per model from the runs before it: for swaps the mean excess (run − estimate), for
    resident runs the mean ratio, each moved :data:`LEARN` of the way by every run. What sharing one profile
    among a model's functions could learn, where each function's own profile sees a few runs a replay."""
    out: dict[str, tuple[list[float], list[float]]] = {"swapped": ([], []), "resident": ([], [])}
    excess: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for r in records:
        model, run, est = model_of(r["function"]), r["compute_ms"], r["expected_ms"]
        kind = "swapped" if r["swapped"] else "resident"
        out[kind][0].append(run - est)
        if r["swapped"]:
            e = excess.get(model, 0.0)
            out[kind][1].append(run - (est + e))
            excess[model] = e + LEARN * (run - est - e)
        else:
            q = ratio.get(model, 1.0)
            out[kind][1].append(run - est * q)
            ratio[model] = q + LEARN * (run / est - q)
    return out


def as_seen(records: list[dict]) -> list[str]:
    """A row per model's swaps as the scheduler learns them: from the run's message to its reply read (``to_worker
    + worker + from_worker``, what its profile's swap overhead is fitted to), against the estimate, p10-p50-p90
    of the estimate's excess; and, where the records carry the copy it expected (``copy_ms``, since session
    25), the median of what the estimate counted beyond the copy (the swap's overhead, for a copy-bound swap:
    one whose copy was expected longer than the model's resident runs)."""
    resident: dict[str, list[float]] = {}
    for r in records:
        if not r["swapped"]:
            resident.setdefault(model_of(r["function"]), []).append(r["expected_ms"])
    out = []
    for (model, kind), rs in sorted(by_model(records).items()):
        if kind != "swapped":
            continue
        seen = [r for r in rs if min(r.get(k, -1.0) for k in PIPES) >= 0]
        if not seen:
            continue
        over = [r["expected_ms"] - sum(r[k] for k in PIPES) for r in seen]
        alone = statistics.median(resident[model]) if model in resident else None
        beyond = [r["expected_ms"] - r["copy_ms"] for r in seen
                  if alone is not None and r.get("copy_ms", -1.0) > alone]
        out.append(f"| {model} | {len(seen)} | " + " | ".join(f"{percentile(over, q):+.2f}" for q in (10, 50, 90))
                   + f" | {f'{statistics.median(beyond):.2f} ({len(beyond)})' if beyond else '-'} |")
    return out


PIPES = ("to_worker_ms", "worker_ms", "from_worker_ms")
"""A run from its message's sending to its reply's reading, in a record's parts."""


def rows(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """A row per group of runs: the group's two labels, runs, median run and estimate, run / estimate p10-p90."""
    out = []
    for (label, kind), rs in sorted(groups.items()):
        ratio = [r["compute_ms"] / r["expected_ms"] for r in rs]
        out.append(f"| {label} | {kind} | {len(rs)} | "
                   f"{statistics.median(r['compute_ms'] for r in rs):.2f} | "
                   f"{statistics.median(r['expected_ms'] for r in rs):.2f} | "
                   + " | ".join(f"{percentile(ratio, q):.2f}" for q in (10, 50, 90)) + " |")
    return out


def by_model(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((model_of(r["function"]), "swapped" if r["swapped"] else "resident"), []).append(r)
    return groups


def by_batch(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs of one request and batches, each resident or swapped, every model together."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault(("one request" if r["requests"] == 1 else "a batch",
                           "swapped" if r["swapped"] else "resident"), []).append(r)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+", help="directories holding trace_raw/")
    args = ap.parse_args()
    for d in args.traces:
        records = runs(d)
        print(f"## {d}\n")
        if not records:
            print("No run reported its estimate (traces before 2026-11-29's thirteenth session).\n")
            continue
        print("| model | run | runs | run ms (median) | expected ms (median) | run / expected p10 | p50 | p90 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows(by_model(records))) + "\n")
        print("| runs of | run | runs | run ms (median) | expected ms (median) | run / expected p10 | p50 | p90 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows(by_batch(records))) + "\n")
        print("Swaps as the scheduler learns them (`as_seen`): the estimate less the run from its message sent to "
              "its reply read, p10 / p50 / p90 (positive: the estimate was longer), and the median of what the "
              "estimate counted beyond the copy it expected, for copy-bound swaps (records with `copy_ms`).\n")
        print("| model | swaps | estimate − seen p10 | p50 | p90 | counted beyond the copy (swaps) |")
        print("|---|---:|---:|---:|---:|---|")
        print("\n".join(as_seen(records)) + "\n")
        print("A correction learned per model, replayed on each replay's runs in send order (`per_model`): how far "
              "runs were from their estimate, as dispatched and corrected.\n")
        print("| replay | run | runs | \\|error\\| ms p50 | p90 | over by > 1 ms | corrected \\|error\\| p50 | p90 | "
              "over by > 1 ms |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, replay in read_raw(d).items():
            for kind, (raw, fixed) in per_model(replay_runs(replay)).items():
                if raw:
                    print(f"| {name} | {kind} | {len(raw)} | " + " | ".join(
                        f"{percentile([abs(x) for x in v], 50):.2f} | {percentile([abs(x) for x in v], 90):.2f} | "
                        f"{sum(x > 1.0 for x in v) / len(v):.1%}" for v in (raw, fixed)) + " |")
        print()


if __name__ == "__main__":
    main()
