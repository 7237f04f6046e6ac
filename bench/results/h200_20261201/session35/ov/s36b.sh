#!/bin/bash
# Session 35, second lease of nvidia-h200 (the rest of the device time, ~7 min), run in the call's foreground:
# bench/overhead.py twice on main (daf42ab: nothing on the serving path changed since session 34's e47d012), then
# two replays of swapserve at N = 400 with the node's defaults (--repeats 2): how often 98 % at 400 holds on one
# GPU, with the CPU canary of each replay (bench/by_canary.py).
set -u
source bench/lease.sh .whl/s36b.sh; R=$LEASE_RESULTS
SLO=$(ls $PWD/bench/results/h200_*/swap_latency.json | tail -1)
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2; do
  echo "=== step overhead $i $(date +%T)"
  timeout 60 python bench/overhead.py --out $R/ov/run_$i $OV > $R/ov_$i.log 2>&1
  echo "ov rc=$?"; overhead_results $R/ov/run_$i
done
echo "=== step trace 400 x2 $(date +%T)"
timeout 370 python bench/trace.py --out $R/rep400 --policies swapserve --sweep 400 --repeats 2 --duration 30 \
  --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO > $R/rep400.log 2>&1
echo "trace rc=$?"; trace_results $R/rep400
python - "$R/rep400/trace.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["policies"]["swapserve"]["sweep"][0]
print("RESULT runs", p.get("attainment_runs"), p.get("requests_in_slo_runs"), p["status_codes"], p.get("cpu_canary"))
PY
echo "=== all done $(date +%T)"
