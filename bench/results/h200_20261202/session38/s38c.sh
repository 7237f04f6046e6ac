#!/bin/bash
# Session 38, lease 2 (one H200): the one-GPU trace at N = 400 on main after session 37's scheduler cut (c60db31:
# the cold-start grace computed only where a finish misses its deadline), two replays on one node, as session 34
# ran it (30 s measured after 5 s of warm-up, raw records kept, SLOs from the latest swap_latency.json).
set -u
source bench/lease.sh .whl/s38c.sh; R=$LEASE_RESULTS
SLO=$(ls $PWD/bench/results/h200_*/swap_latency.json | tail -1); echo "SLO from $SLO"
S=$R/rep400; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve 400 x2 $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 400 --repeats 2 $T > $R/swapserve.log 2>&1
echo "swapserve rc=$?"; trace_results $S
python bench/piece_turns.py $S > $R/piece_turns.md 2>&1; echo "piece_turns rc=$?"
echo "=== all done $(date +%T)"
