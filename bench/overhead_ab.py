"""Two codes' ``bench/overhead.py`` runs on one machine, pair by pair: DIR holds ``new_<i>/`` and ``base_<i>/`` (each
an ``--out`` of overhead.py), run alternating (pair 1 new first, pair 2 base first, ...). The machine's speed drifts
between runs (the same code's p50 moved 0.51 → 0.75 ms within one lease on an H200), so what a change did is read
from the pairs — each new run against the base run beside it — not from two sets' medians.

    python bench/overhead_ab.py DIR [--title "..."]

Writes DIR/ab.json (each run's p50, p99, requests/s, CPU canary and parts; each pair's differences), DIR/ab.md (the
table) and DIR/ab.png (p50 of each pair, new beside base, against the 0.5 ms target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import PARTS  # noqa: E402

TARGET_MS = 0.5


def load(root: Path) -> list[dict]:
    """The pairs found under ``root``, in order: {"pair", "new", "base"}, each side a run's summary."""
    pairs = []
    i = 1
    while (root / f"new_{i}" / "overhead.json").exists() and (root / f"base_{i}" / "overhead.json").exists():
        pair = {"pair": i}
        for side in ("new", "base"):
            d = json.loads((root / f"{side}_{i}" / "overhead.json").read_text())
            pair[side] = {"p50_ms": d["p50_overhead_ms"], "p99_ms": d["p99_overhead_ms"], "rps": d["max_rps"],
                          "canary_ms": (d.get("cpu_canary") or {}).get("median_ms"),
                          "parts_ms": d["p50_parts_ms"]}
        pair["first"] = "new" if i % 2 else "base"
        pair["p50_diff_ms"] = pair["new"]["p50_ms"] - pair["base"]["p50_ms"]
        pair["parts_diff_ms"] = {k: pair["new"]["parts_ms"][k] - pair["base"]["parts_ms"][k] for k in PARTS}
        pairs.append(pair)
        i += 1
    if not pairs:
        raise SystemExit(f"no pairs under {root}: expected new_1/overhead.json and base_1/overhead.json")
    return pairs


def table(pairs: list[dict], title: str) -> str:
    head = "| pair | run | p50 ms | p99 ms | req/s | canary ms | " + " | ".join(PARTS) + " |\n"
    lines = [f"# {title}\n", "Runs in the order listed (pairs alternate which code goes first). Parts: p50 of each "
             "(ms; bench/overhead.py's PARTS).\n", head + "|---:|---|" + "---:|" * (4 + len(PARTS))]
    for p in pairs:
        order = ("new", "base") if p["first"] == "new" else ("base", "new")
        for side in order:
            r = p[side]
            canary = f"{r['canary_ms']:.3f}" if r["canary_ms"] is not None else "–"
            lines.append(f"| {p['pair']} | {side} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rps']:.0f} | {canary} | "
                         + " | ".join(f"{r['parts_ms'][k]:.3f}" for k in PARTS) + " |")
    lines.append("\nnew − base, pair by pair (ms):\n")
    lines.append("| pair | p50 | " + " | ".join(PARTS) + " |\n|---:|---:|" + "---:|" * len(PARTS))
    for p in pairs:
        lines.append(f"| {p['pair']} | {p['p50_diff_ms']:+.3f} | "
                     + " | ".join(f"{p['parts_diff_ms'][k]:+.3f}" for k in PARTS) + " |")
    diffs = [p["p50_diff_ms"] for p in pairs]
    lower = sum(d < 0 for d in diffs)
    lines.append(f"\np50 lower with new in {lower} of {len(pairs)} pairs; median difference "
                 f"{statistics.median(diffs) * 1e3:+.0f} µs. new's p50 {min(p['new']['p50_ms'] for p in pairs):.3f}–"
                 f"{max(p['new']['p50_ms'] for p in pairs):.3f} ms, base's {min(p['base']['p50_ms'] for p in pairs):.3f}–"
                 f"{max(p['base']['p50_ms'] for p in pairs):.3f}; runs at or under {TARGET_MS} ms: new "
                 f"{sum(p['new']['p50_ms'] <= TARGET_MS for p in pairs)}, base "
                 f"{sum(p['base']['p50_ms'] <= TARGET_MS for p in pairs)}.\n")
    return "\n".join(lines)


def plot(pairs: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(pairs) + 3, 3.6))
    xs = range(len(pairs))
    for off, side, color in ((-0.2, "base", "tab:gray"), (0.2, "new", "tab:blue")):
        vals = [p[side]["p50_ms"] for p in pairs]
        ax.bar([x + off for x in xs], vals, width=0.4, color=color, label=side)
        for x, v in zip(xs, vals):
            ax.text(x + off, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(TARGET_MS, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_MS} ms")
    ax.set_xticks(list(xs), [f"pair {p['pair']}\n({p['first']} first)" for p in pairs], fontsize=8)
    ax.set_ylabel("p50 overhead (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--title", default="bench/overhead.py, new against base, alternating")
    args = ap.parse_args()
    pairs = load(args.dir)
    (args.dir / "ab.json").write_text(json.dumps({"title": args.title, "target_ms": TARGET_MS, "pairs": pairs},
                                                 indent=1))
    md = table(pairs, args.title)
    (args.dir / "ab.md").write_text(md)
    plot(pairs, args.dir / "ab.png", args.title)
    print(md)


if __name__ == "__main__":
    main()
