"""A horizontal bar chart of a benchmark's summary numbers (the plot beside its JSON and table)."""

from __future__ import annotations

from pathlib import Path


def bars(out: Path, title: str, rows: list[tuple[str, float]], unit: str = "ms", target: float | None = None) -> None:
    """``rows``: (label, value), drawn top to bottom; ``target``: a dashed line where the goal is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    labels, values = [r[0] for r in rows][::-1], [r[1] for r in rows][::-1]
    ax.barh(labels, values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    if target is not None:
        ax.axvline(target, color="tab:red", linestyle="--", label=f"target {target:g} {unit}")
        ax.legend(fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
