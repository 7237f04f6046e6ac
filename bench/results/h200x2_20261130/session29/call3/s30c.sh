#!/bin/bash
# Session 29, second lease call on the same warm machine: overhead.py on main's HEAD, then a third two-GPU
# N = 800 replay (the sweep's exports in /tmp/w_two are reused).
set -u
source bench/lease.sh .whl/s30c.sh; R=$LEASE_RESULTS
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --slo-from $PWD/$SLO"
echo "=== step two 800 again $(date +%T)"
python bench/trace.py --out $R/two800 --policies swapserve --sweep 800 --work /tmp/w_two --peer-copies $T > $R/two800.log 2>&1
echo "two800 rc=$?"; trace_results $R/two800
echo "=== all done $(date +%T)"
