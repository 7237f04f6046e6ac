"""Attainment against the machine's speed, over the committed replays: every point of a policy at one N on one
count of GPUs in ``bench/results/**/trace.json`` (each replay of it, where a point had several; a replay whose
trace.json was copied as a headline, once), with the CPU canary that ran beside it (``bench/canary.py``: the
median time of a fixed piece of Python, 0.54–1.1 ms on the lent H200 machines so far), sorted by the canary,
then how often the replays in each band of canary reached 98 %.

The lent machines of one kind differ in CPU speed from lease to lease, and the node's path outside the GPU (the
client, HTTP, the gateway, the decision, the messages) is Python on that CPU: on a slow one every part of it is
slower, and requests of 10 ms SLOs swapped in ~5 ms miss. This says how much of the spread of a point's
attainment goes with the machine rather than with the code.

    python bench/by_canary.py [ROOT ...] [--gpus 1] [--n 400] [--policy swapserve] [--since 2026-11-30]
        [--bands 0.7 0.9] [--plot by_canary.png]

Points without a canary (before 2026-11-29's sixteenth session) are left out. Prints markdown; ``--plot`` also
draws each replay's attainment against its canary, with the target's line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET = 0.98
"""The node issue's attainment target."""


def replays(roots: list[Path], gpus: int, n: int, policy: str, since: str = "") -> list[dict]:
    """One row a replay: ``path`` (the trace.json), ``date``, ``canary_ms``, ``attainment``, ``requests_in_slo``
    (None where a point of several replays did not keep each one's), ``fronts``."""
    rows = []
    for root in roots:
        for path in sorted(root.rglob("trace.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("gpus") != gpus or doc.get("date", "") < since:
                continue
            entry = doc.get("policies", {}).get(policy)
            for point in (entry or {}).get("sweep", []):
                canary = (point.get("cpu_canary") or {}).get("median_ms")
                if point.get("n") != n or not canary:
                    continue
                runs = point.get("attainment_runs") or [point["attainment"]]
                in_slo = point.get("requests_in_slo_runs") or [point.get("requests_in_slo")]
                for i, att in enumerate(runs):
                    rows.append({"path": path, "date": doc.get("date", ""), "canary_ms": canary, "attainment": att,
                                 "requests_in_slo": in_slo[i] if i < len(in_slo) else None,
                                 "fronts": (entry.get("options") or {}).get("fronts", doc.get("fronts"))})
    # A headline trace.json is a copy of one of its session's: each replay once (under the shorter path).
    unique: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: (len(r["path"].parts), str(r["path"]))):
        unique.setdefault((r["date"], r["canary_ms"], r["attainment"], r["requests_in_slo"]), r)
    return sorted(unique.values(), key=lambda r: (r["canary_ms"], str(r["path"])))


def bands(rows: list[dict], edges: list[float]) -> list[tuple[str, int, int]]:
    """``(band, replays, of them at TARGET or more)`` for the canary bands cut at ``edges`` (ascending)."""
    out = []
    bounds = [0.0, *edges, float("inf")]
    for lo, hi in zip(bounds, bounds[1:]):
        inside = [r for r in rows if lo < r["canary_ms"] <= hi]
        label = f"≤ {hi:g} ms" if lo == 0.0 else f"> {lo:g} ms" if hi == float("inf") else f"{lo:g}–{hi:g} ms"
        out.append((label, len(inside), sum(r["attainment"] >= TARGET for r in inside)))
    return out


def render(rows: list[dict], edges: list[float], root: Path) -> str:
    lines = ["| canary ms | attainment | requests in SLO | fronts | date | trace.json |",
             "|---:|---:|---:|---:|---|---|"]
    for r in rows:
        in_slo = "-" if r["requests_in_slo"] is None else f"{r['requests_in_slo']:.4f}"
        try:
            where = r["path"].relative_to(root)
        except ValueError:
            where = r["path"]
        fronts = "-" if r["fronts"] is None else r["fronts"]
        lines.append(f"| {r['canary_ms']:.3f} | {r['attainment']:.3f} | {in_slo} | {fronts} | {r['date']} "
                     f"| `{where}` |")
    lines += ["", f"| canary | replays | at {TARGET:.0%} or more |", "|---|---:|---:|"]
    lines += [f"| {label} | {count} | {met} |" for label, count, met in bands(rows, edges)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Each replay's attainment against its canary, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    met = [r for r in rows if r["attainment"] >= TARGET]
    missed = [r for r in rows if r["attainment"] < TARGET]
    for group, marker, label in ((met, "o", f"≥ {TARGET:.0%}"), (missed, "x", f"< {TARGET:.0%}")):
        ax.scatter([r["canary_ms"] for r in group], [r["attainment"] for r in group], marker=marker, label=label)
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("CPU canary, median ms (higher: a slower machine)")
    ax.set_ylabel("attainment")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", type=Path, default=[Path(__file__).resolve().parent / "results"])
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--policy", default="swapserve")
    ap.add_argument("--since", default="", help="only traces of this date (YYYY-MM-DD) or later")
    ap.add_argument("--bands", type=float, nargs="+", default=[0.7, 0.9], help="canary medians (ms) that cut bands")
    ap.add_argument("--plot", type=Path, help="also draw attainment against the canary into this PNG")
    args = ap.parse_args()
    rows = replays(args.roots, args.gpus, args.n, args.policy, args.since)
    title = f"{args.policy}, N = {args.n} on {args.gpus} GPU(s): {len(rows)} replays with a canary"
    print(f"## {title}\n")
    print(render(rows, sorted(args.bands), args.roots[0]))
    if args.plot:
        plot(rows, args.plot, title + (f" since {args.since}" if args.since else ""))


if __name__ == "__main__":
    main()
