#!/bin/bash
# Session 39, lease 1 (one H200): the one-GPU trace at N = 400 on main (1d85472), SLOs measured on this machine,
# two replays on one node, with each refusal's expected lateness recorded (c90f48e: trace.md's refusals table) —
# how many refusals were by a hair; then two overhead runs of main.
set -u
source bench/lease.sh .whl/s39a.sh; R=$LEASE_RESULTS
S=$R/rep400; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work"
echo "=== step trace swapserve 400 x2, SLOs measured here $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 400 --repeats 2 $T > $R/swapserve.log 2>&1
echo "swapserve rc=$?"; trace_results $S
python -c "import json; j=json.load(open('$S/trace.json')); print('SLO', j.get('slo_source'), j.get('link_profile'))"
grep -A12 -i "refus" $S/trace.md | head -40
echo "=== step overhead x2 $(date +%T)"
mkdir -p $R/ov
for i in 1 2; do
  timeout 75 python bench/overhead.py --out $R/ov/$i --devices cuda:0 --requests 2000 --warmup 200 --seconds 1 --spin-ms 1 > $R/ov/$i.log 2>&1
  echo "overhead $i rc=$?"; overhead_results $R/ov/$i
done
echo "=== all done $(date +%T)"
