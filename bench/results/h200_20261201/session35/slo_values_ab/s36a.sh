#!/bin/bash
# Session 35, first lease of nvidia-h200 (one GPU; only that kind is lent today), ~10 min; poll with
# bench/lease_poll.sh at once after each call.
# The A/B of slo_values (a857fb2, off by default, not yet measured): swapserve at N = 400 on one node, the setting
# alternated by PATCH between replays (A B B A A B B A), four replays each, raw records kept (paired.md).
set -u
source bench/lease.sh .whl/s36a.sh; R=$LEASE_RESULTS
SLO=$(ls $PWD/bench/results/h200_*/swap_latency.json | tail -1); echo "SLO from $SLO"
echo "=== step trace slo_values A/B $(date +%T)"
timeout 900 python bench/trace.py --out $R/ab --policies swapserve --sweep 400 --repeats 8 \
  --alternate slo_values=false,true --duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO \
  > $R/ab.log 2>&1
echo "trace rc=$?"
for d in $R/ab/slo_values_*; do trace_results $d; done
python - $R/ab <<'PY'
import json, sys, pathlib
for d in sorted(pathlib.Path(sys.argv[1]).glob("slo_values_*")):
    p = json.loads((d / "trace.json").read_text())["policies"]["swapserve"]["sweep"][0]
    print("RESULT", d.name, "runs", p.get("attainment_runs"), "in_slo", p.get("requests_in_slo_runs"))
PY
head -30 $R/ab/paired.md
echo "=== all done $(date +%T)"
