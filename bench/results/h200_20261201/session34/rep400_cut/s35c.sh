#!/bin/bash
# Session 34, third call (~6 min, the last of the session's device time): two more replays of swapserve at N = 400
# on one node (--repeats 2), main with the gpu-marked engine tests (nothing on the serving path changed since the
# sweep): how often 98 % at 400 holds on one GPU.
set -u
source bench/lease.sh .whl/s35c.sh; R=$LEASE_RESULTS
SLO=$(ls $PWD/bench/results/h200_*/swap_latency.json | tail -1)
echo "=== step trace 400 x2 $(date +%T)"
timeout 330 python bench/trace.py --out $R/rep400 --policies swapserve --sweep 400 --repeats 2 --duration 30 --warmup 5 \
  --raw --work /tmp/trace-work --slo-from $SLO > $R/rep400.log 2>&1
echo "trace rc=$?"
python - "$R/rep400/trace.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["policies"]["swapserve"]["sweep"][0]
print("RESULT runs", p.get("attainment_runs"), p.get("requests_in_slo_runs"), p["status_codes"])
PY
grep -i "attainment" $R/rep400.log | tail -4
echo "=== all done $(date +%T)"
