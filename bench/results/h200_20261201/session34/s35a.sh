#!/bin/bash
# Session 34, one lease of nvidia-h200 (one GPU; no two-GPU kind was lent today), ~22 min; poll with
# bench/lease_poll.sh at once after each call.
# (1) bench/overhead.py twice on main (8967ab6); (2) the headline one-GPU sweep with every policy on today's main
# (the last, session 18's, ran code of 2026-11-29): swapserve N = 300/400/450/500, lru_ondemand 25/50/100,
# fifo_lru and dedicated 100/200, 30 s measured after 5 s of warm-up, raw records kept; (3) bench/piece_turns.py
# and bench/overdue.py on the swapserve sweep; (4) the GPU-marked tests, last.
set -u
source bench/lease.sh .whl/s35a.sh; R=$LEASE_RESULTS
SLO=$(ls $PWD/bench/results/h200_*/swap_latency.json | tail -1); echo "SLO from $SLO"
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2; do
  echo "=== step overhead $i $(date +%T)"
  timeout 120 python bench/overhead.py --out $R/ov/new_$i $OV > $R/ov_$i.log 2>&1
  echo "ov rc=$?"; overhead_results $R/ov/new_$i
done
S=$R/sweep; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 300,400,450,500 $T > $R/swapserve.log 2>&1
echo "swapserve rc=$?"; trace_results $S
echo "=== step trace lru_ondemand $(date +%T)"
python bench/trace.py --out $S --policies lru_ondemand --sweep 25,50,100 $T > $R/lru.log 2>&1
echo "lru rc=$?"
echo "=== step trace fifo_lru, dedicated $(date +%T)"
python bench/trace.py --out $S --policies fifo_lru,dedicated --sweep 100,200 $T > $R/base.log 2>&1
echo "base rc=$?"; trace_results $S
python bench/piece_turns.py $S > $R/piece_turns.md 2>&1; echo "piece_turns rc=$?"
python bench/overdue.py $S > $R/overdue.md 2>&1; echo "overdue rc=$?"
echo "=== step gpu tests $(date +%T)"
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -4 $R/gpu_tests.txt
echo "=== all done $(date +%T)"
