#!/bin/bash
# Session 40, one lease of nvidia-h200: (1) the GPU tests on main (with the new test_gpu_context.py: the worker's
# the only CUDA context, the link profile measured); (2) bench/overhead.py twice; (3) the headline one-GPU sweep
# with every policy on this main, as session 34's (swapserve N = 300/400/450, lru_ondemand 25/50/100, fifo_lru
# and dedicated 100/200; SLOs from h200_20261127/swap_latency.json; 30 s measured after 5 s of warm-up, raw kept).
set -u
source bench/lease.sh .whl/s40a.sh; R=$LEASE_RESULTS
echo "=== step gpu tests $(date +%T)"
timeout 330 python -m pytest -q -p no:cacheprovider -m gpu tests tests/integration/test_worker_lanes.py \
  --ignore=tests/integration/test_oip_clients.py > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -6 $R/gpu_tests.txt
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2; do
  echo "=== step overhead $i $(date +%T)"
  timeout 120 python bench/overhead.py --out $R/ov/$i $OV > $R/ov_$i.log 2>&1
  echo "ov rc=$?"; overhead_results $R/ov/$i
done
SLO=$PWD/bench/results/h200_20261127/swap_latency.json
S=$R/sweep; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 300,400,450 $T > $R/swapserve.log 2>&1
echo "swapserve rc=$?"; trace_results $S
echo "=== step trace lru_ondemand $(date +%T)"
python bench/trace.py --out $S --policies lru_ondemand --sweep 25,50,100 $T > $R/lru.log 2>&1
echo "lru rc=$?"
echo "=== step trace fifo_lru, dedicated $(date +%T)"
python bench/trace.py --out $S --policies fifo_lru,dedicated --sweep 100,200 $T > $R/base.log 2>&1
echo "base rc=$?"; trace_results $S
echo "=== all done $(date +%T)"
