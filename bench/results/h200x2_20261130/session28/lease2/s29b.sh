#!/bin/bash
# Session 28, second lease (the first was lost mid-sweep): one two-GPU replay at N = 800 of this session's code
# (eviction values refreshed in slices), straight into $OUT so that what it wrote comes back even if cut off.
set -u
source bench/lease.sh .whl/s29b.sh $OUT/res4; R=$LEASE_RESULTS
SLO=bench/results/h200_20261127/swap_latency.json
echo "=== step trace swapserve 800, two GPUs $(date +%T)"
timeout ${TRACE_LIMIT:-490} python bench/trace.py --out $R/two --policies swapserve --sweep 800 --work /tmp/w_two \
  --peer-copies --duration 30 --warmup 5 --max-batch 4 --raw --slo-from $OLDPWD/$SLO > $R/two.log 2>&1
echo "sweep rc=$?"; trace_results $R/two
echo "=== all done $(date +%T)"
