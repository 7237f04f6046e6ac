"""Session 38's replays at N = 400 scored with other SLO tables (run from the repository's root):

    python bench/results/h200_20261202/session38/rescore.py

- each replay with its own trace.json's SLOs (what trace.md says) and with 2026-11-27's table (floors at 55.1 GB/s);
- lease 2's (rep400/, whose node measured its host link at 41.9 GB/s) with that table's floors rescaled to 41.9.
"""

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, "bench")
spec = importlib.util.spec_from_file_location("bench_trace", "bench/trace.py")
trace = importlib.util.module_from_spec(spec)
sys.modules["bench_trace"] = trace
spec.loader.exec_module(trace)

HERE = Path(__file__).resolve().parent
TABLE = Path("bench/results/h200_20261127/swap_latency.json")


def score(directory: Path, slo: dict[str, float], label: str) -> None:
    """Each replay's attainment with ``slo`` (by model): its functions less those ``trace.worst_requests`` finds
    over their SLO."""
    for name, records in sorted(trace.read_raw(directory).items()):
        by_fn = defaultdict(list)
        for r in records:
            by_fn[r["function"]].append(r)
        ok = len(by_fn) - len(trace.worst_requests(by_fn, {f: slo[trace.model_of(f)] for f in by_fn}))
        print(f"| {directory.name} | {name} | {label} | {ok} of {len(by_fn)} | {ok / len(by_fn):.3f} |")


doc = json.loads(TABLE.read_text())
rows = {r["model"]: r for r in doc["models"] if r.get("dtype") == "float16" and "error" not in r}
table, _ = trace.slo_table(list(rows), TABLE)
print("| replays | replay | SLOs | functions in SLO | attainment |\n|---|---|---|---:|---:|")
for d in (HERE / "rep400", HERE / "rep400_here"):
    score(d, json.loads((d / "trace.json").read_text())["slo_ms"], "its own")
    score(d, table, "2026-11-27's table")
bw = json.loads((HERE / "rep400" / "trace.json").read_text())["link_profile"]["h2d_GBps"]
scaled = {m: max(10.0, 3 * (r["native_graph_ms"] + r["floor_ms"] * doc["h2d_pinned_GBps"] / bw)) for m, r in rows.items()}
score(HERE / "rep400", scaled, f"floors at its {bw:.1f} GB/s")
