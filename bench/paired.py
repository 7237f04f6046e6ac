"""Two traces of the same requests, compared request by request: from the raw records of ``bench/trace.py
--raw`` run twice with one seed (two codes or settings, on one machine), each request of A paired with the same
request of B — the same function's k-th request, replay ``r<i>`` with replay ``r<i>`` — and the differences
summed up:

  * the median of B − A over the pairs both answered, with a 95 % bootstrap interval, for the latency, the
    time outside the run (latency − ``compute_ms``) and the run itself;
  * the requests in their SLO in one trace and not the other (refused or failed: not in SLO), with the
    two-sided sign test's p-value on those flips;
  * both per replay: requests of one replay share its machine's moments, so a difference is as sure as the
    replays agree on it (the pooled p-value takes the requests as independent, which they are not quite).

Attainment moves by whole functions (N=400, 20 s: ~2 requests each) and by ±0.1–0.2 between replays of one
node; a change of a few hundred µs per request does not show in it, and does in the median of a thousand paired
differences. A replay slowed as a whole (the machine, not the code) moves the pairs inside it together: it
widens the interval rather than moving the median.

    python bench/paired.py A_DIR B_DIR [--exclude gpt2-medium] [--resamples 2000]

Each directory holds trace_raw/ and trace.json (for the SLOs). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import model_of, read_raw  # noqa: E402  (bench/trace.py)

MEASURES = {  # name → value of an answered request (ms)
    "latency": lambda r: r["latency_ms"],
    "outside the run": lambda r: r["latency_ms"] - r["compute_ms"],
    "the run": lambda r: r["compute_ms"],
}


def keyed(records: list[dict]) -> dict[tuple[str, int], dict]:
    """Records by (function, k): its k-th request in send order — the same request in any replay of one seed."""
    seen: dict[str, int] = {}
    out = {}
    for r in records:
        k = seen[r["function"]] = seen.get(r["function"], -1) + 1
        out[r["function"], k] = r
    return out


def pairs(a: Path, b: Path, exclude: set[str]) -> dict[str, list[tuple[dict, dict]]]:
    """By replay (matched by name), (A's record, B's) of every request both traces sent."""
    ra, rb = read_raw(a), read_raw(b)
    out = {}
    for name in sorted(ra.keys() & rb.keys()):
        ka, kb = keyed(ra[name]), keyed(rb[name])
        out[name] = [(ka[k], kb[k]) for k in sorted(ka.keys() & kb.keys()) if model_of(k[0]) not in exclude]
    return out


def median_interval(diffs: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``diffs`` and a 95 % percentile-bootstrap interval of it."""
    rng = np.random.default_rng(seed)
    boot = np.median(diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))], axis=1)
    return float(np.median(diffs)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` against ``losses`` under no difference (ties left out)."""
    n = wins + losses
    if not n:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: Path, b: Path, exclude: set[str], resamples: int = 2000) -> dict:
    """The paired comparison over all replays, and per replay (``by_replay``): requests of one replay share its
    machine's moments (a slowed stretch moves them together), so a difference is only as sure as its replays
    agree."""
    slo = json.loads((a / "trace.json").read_text())["slo_ms"]
    by_replay = pairs(a, b, exclude)
    result = _summary([p for ps in by_replay.values() for p in ps], slo, resamples)
    result["by_replay"] = {name: _summary(ps, slo, resamples) for name, ps in by_replay.items()}
    return result


def _summary(matched: list[tuple[dict, dict]], slo: dict[str, float], resamples: int) -> dict:
    answered = [(x, y) for x, y in matched if x["status"] == 200 and y["status"] == 200]
    result: dict = {"pairs": len(matched), "answered": len(answered), "measures": {}}
    for name, value in MEASURES.items():
        if answered:
            d = np.array([value(y) - value(x) for x, y in answered])
            med, low, high = median_interval(d, resamples)
            result["measures"][name] = {"median": med, "low": low, "high": high, "b_lower": float(np.mean(d < 0))}

    def in_slo(r: dict) -> bool:
        return r["status"] == 200 and r["latency_ms"] <= slo[model_of(r["function"])]

    only_a = sum(in_slo(x) and not in_slo(y) for x, y in matched)
    only_b = sum(in_slo(y) and not in_slo(x) for x, y in matched)
    result["in_slo"] = {"a": sum(in_slo(x) for x, _ in matched), "b": sum(in_slo(y) for _, y in matched),
                        "only_a": only_a, "only_b": only_b, "p": sign_test(only_b, only_a)}
    return result


def table(a: Path, b: Path, result: dict) -> str:
    lines = [f"A = {a}, B = {b}: {result['pairs']} requests sent by both, {result['answered']} answered by both.", "",
             "| measure (answered by both) | median B − A (ms) | 95 % interval | B lower in |",
             "|---|---:|---|---:|"]
    for name, m in result["measures"].items():
        lines.append(f"| {name} | {m['median']:+.3f} | [{m['low']:+.3f}, {m['high']:+.3f}] | {m['b_lower']:.0%} |")
    s = result["in_slo"]
    lines += ["", f"In SLO: A {s['a']}, B {s['b']} of {result['pairs']}; in A's only {s['only_a']}, in B's only "
              f"{s['only_b']} (sign test p = {s['p']:.3g}).", "",
              "| replay | pairs | latency, median B − A (ms) | in A's SLO only | in B's only |", "|---|---:|---|---:|---:|"]
    for name, r in result["by_replay"].items():
        m = r["measures"].get("latency")
        lat = f"{m['median']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]" if m else "-"
        lines.append(f"| {name} | {r['pairs']} | {lat} | {r['in_slo']['only_a']} | {r['in_slo']['only_b']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="trace directory A (trace_raw/, trace.json)")
    ap.add_argument("b", type=Path, help="trace directory B, the same seed and N")
    ap.add_argument("--exclude", default="", help="zoo models to leave out, comma-separated")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    result = compare(args.a, args.b, {m for m in args.exclude.split(",") if m}, args.resamples)
    if not result["pairs"]:
        sys.exit(f"no request of {args.a} is in {args.b}: replays of one seed, with --raw?")
    print(table(args.a, args.b, result))


if __name__ == "__main__":
    main()
