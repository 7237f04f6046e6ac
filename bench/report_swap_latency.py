"""Table and plot for bench/swap_latency.py results; merges several partial runs of one card.

    python bench/report_swap_latency.py OUT_DIR part1.json [part2.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ["native_ms", "native_graph_ms", "ondemand_ms", "bulk_ms", "swapserve_ms", "floor_ms"]


def merge(parts: list[dict]) -> dict:
    gpus = {p["gpu"] for p in parts}
    if len(gpus) != 1:
        raise SystemExit(f"refusing to merge runs from different cards: {gpus}")
    out = dict(parts[0])
    seen: dict[tuple[str, str], dict] = {}
    for p in parts:
        for row in p["models"]:
            seen[(row["model"], row["dtype"])] = row
    out["models"] = list(seen.values())
    out["h2d_pinned_GBps"] = statistics.median(p["h2d_pinned_GBps"] for p in parts)
    return out


def table(result: dict) -> str:
    lines = [
        f"# Swap latency — {result['gpu']}, {result.get('date', '')}",
        "",
        f"Batch 1, median of {result.get('runs', '?')} runs after warm-up, one process, one card; pinned host→device "
        f"{result['h2d_pinned_GBps']:.1f} GB/s. Limit = max(floor, native graph). Times in ms.",
        "",
        "| model | dtype | MB | native | native graph | on-demand | bulk | **swapserve** | floor | × limit | "
        "on-demand / swapserve | swapserve eager | resident (graph) | first swap | CPU/swap | bit-identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | error: {r['error'][:80]} |" + " |" * 14)
            continue
        ident = "yes" if r["bit_identical_graph"] and r["bit_identical_eager"] else "**NO**"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['bytes'] / 1e6:.0f} | {r['native_ms']:.2f} | {r['native_graph_ms']:.2f} "
            f"| {r['ondemand_ms']:.1f} | {r['bulk_ms']:.2f} | **{r['swapserve_ms']:.2f}** | {r['floor_ms']:.2f} "
            f"| {r['vs_limit']:.2f} | {r['ondemand_over_swapserve']:.1f} | {r['swapserve_eager_ms']:.2f} "
            f"| {r['swapserve_resident_ms']:.2f} | {r['first_swap_ms']:.0f} | {r['swap_cpu_ms']:.2f} | {ident} |")
    ok = [r for r in result["models"] if "error" not in r]
    if ok:
        ratios = sorted(r["vs_limit"] for r in ok)
        lines += ["", f"swapserve / limit: median {statistics.median(ratios):.2f}, worst {ratios[-1]:.2f} "
                      f"(targets ≤ 1.10 median, ≤ 1.25 each)."]
        beat = [r for r in ok if r["floor_ms"] < r["native_ms"]]
        lines.append(f"Cold swap faster than resident eager PyTorch: {sum(r['swapserve_ms'] < r['native_ms'] for r in beat)}"
                     f" of {len(beat)} models whose floor is below their eager time.")
        big = [r for r in ok if r["bytes"] > 300e6]
        if big:
            lines.append(f"On-demand / swapserve for models over 300 MB: min "
                         f"{min(r['ondemand_over_swapserve'] for r in big):.1f} (target ≥ 5).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in result["models"] if "error" not in r})
    if not dtypes:
        return
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(14, 5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        rows = [r for r in result["models"] if r["dtype"] == dtype and "error" not in r]
        width = 0.8 / len(COLUMNS)
        for k, col in enumerate(COLUMNS):
            xs = [i + (k - len(COLUMNS) / 2) * width + width / 2 for i in range(len(rows))]
            ax.bar(xs, [r[col] for r in rows], width, label=col.removesuffix("_ms"))
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["model"] for r in rows], rotation=20)
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{result['gpu']} — {dtype}, batch 1")
        ax.legend(ncol=6, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict, out: Path) -> None:
    (out / "swap_latency.json").write_text(json.dumps(result, indent=1))
    (out / "swap_latency.md").write_text(table(result))
    plot(result, out / "swap_latency.png")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    render(merge([json.loads(Path(p).read_text()) for p in sys.argv[2:]]), out_dir)
