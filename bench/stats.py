"""The percentile the benchmarks report: nearest rank, rounding the rank down (``xs[int(q / 100 · n)]``)."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs``, a value of ``xs`` itself."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]
