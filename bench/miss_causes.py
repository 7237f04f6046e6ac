"""Why functions missed their SLO in a trace run: for each function whose P98 is over its SLO, the part of
its worst request that was largest, from the raw per-request records of ``bench/trace.py --raw``.

    python bench/miss_causes.py bench/results/<gpu>_<date>/trace.json [raw.jsonl.gz ...]

Parts of a completed request (ms): ``client`` = client latency − the gateway handler's time (HTTP both
ways, the server's loop before the handler runs, the client's reading); ``gateway`` = handler − node;
``controller`` = node − worker − queue (admission, dispatch, the way back); ``queue``; ``place`` (pinning,
evictions, remaps in the worker); ``swap`` = the device phase of a swapped run. A refused or failed worst
request counts as ``refused``. Also prints the attainment each run would have had with every request's
queueing removed, as a bound on what the scheduler's ordering alone could win.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace import p98  # noqa: E402  (bench/trace.py: the attainment's own percentile)


def parts(r: dict) -> dict[str, float]:
    ph = r.get("phases_ms") or {}
    return {"client": r["latency_ms"] - r["server_ms"], "gateway": r["server_ms"] - r["node_ms"],
            "controller": r["node_ms"] - r["worker_ms"] - r["queue_ms"], "queue": r["queue_ms"],
            "place": ph.get("place", 0.0), "swap": ph.get("device", 0.0) if r["swapped"] else 0.0}


def analyse(records: list[dict], slo: dict[str, float]) -> dict:
    by_fn: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_fn[r["function"]].append(r)
    causes: collections.Counter[str] = collections.Counter()
    met_no_queue = 0
    for fn, rs in by_fn.items():
        s = slo[fn.split("-", 1)[1]]
        lat = [r["latency_ms"] if r["status"] == 200 else math.inf for r in rs]
        met_no_queue += p98([x - r["queue_ms"] if r["status"] == 200 else x for x, r in zip(lat, rs)]) <= s
        if p98(lat) <= s:
            continue
        worst = max(rs, key=lambda r: r["latency_ms"] if r["status"] == 200 else math.inf)
        if worst["status"] != 200:
            causes["refused"] += 1
        else:
            p = parts(worst)
            causes[max(p, key=p.__getitem__)] += 1
    ok = [r for r in records if r["status"] == 200]
    medians = {k: round(sorted(parts(r)[k] for r in ok)[len(ok) // 2], 2) for k in ("client", "gateway", "controller")}
    return {"functions": len(by_fn), "missed": sum(causes.values()), "worst_part": dict(causes.most_common()),
            "attainment_without_queueing": round(met_no_queue / len(by_fn), 3), "median_ms": medians}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="trace.json (its SLO table)")
    ap.add_argument("raw", type=Path, nargs="*", help="raw files (default: every one beside trace.json)")
    args = ap.parse_args()
    slo = json.loads(args.trace.read_text())["slo_ms"]
    files = args.raw or sorted((args.trace.parent / "trace_raw").glob("*.jsonl.gz"))
    for f in files:
        with gzip.open(f, "rt") as fh:
            records = [json.loads(line) for line in fh]
        print(f.name.removesuffix(".jsonl.gz"), json.dumps(analyse(records, slo)))


if __name__ == "__main__":
    main()
