#!/bin/bash
# Session 38, lease 3 (one H200): the one-GPU trace at N = 400 on main with the SLOs measured on this machine
# (the node issue's rule: 3 × (native graph + floor) of each fp16 model on this card, the floor at this machine's
# pinned host→GPU bandwidth) rather than taken from 2026-11-27's table (lease 2's machine copied at 41.9 GB/s
# against that table's ~54); two replays on one node; the records are rescored with the old table afterwards.
set -u
source bench/lease.sh .whl/s38d.sh; R=$LEASE_RESULTS
S=$R/rep400_here; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work"
echo "=== step trace swapserve 400 x2, SLOs measured here $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 400 --repeats 2 $T > $R/swapserve.log 2>&1
echo "swapserve rc=$?"; trace_results $S
python -c "import json; j=json.load(open('$S/trace.json')); print('SLO', j.get('slo_source'), j.get('slo_ms'), j.get('link_profile'))"
echo "=== all done $(date +%T)"
