#!/bin/bash
# Session 28 plan (written in session 27), one lease of nvidia-h200-x2, this tree = main at session 27's end
# (value-refresh, the view's estimates made once, the slab's byte copies). Results in /tmp/res4.
# (1) the GPU tests; (2) the two-GPU sweep 400/600/800 (max batch 4, peer copies, 30 s) and LRU on-demand 50/100
# into the same trace.json: the second replay of N = 800 at >= 98 %; (3) overhead.py twice; (4) one GPU, N = 400.
set -u
source bench/lease.sh .whl/s29a.sh; R=$LEASE_RESULTS
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --slo-from $PWD/$SLO"
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED|Error" | tail -6
echo "=== step sweep $(date +%T)"
python bench/trace.py --out $R/two --policies swapserve --sweep 400,600,800 --work /tmp/w_two --peer-copies $T > $R/two.log 2>&1
echo "sweep rc=$?"; trace_results $R/two
echo "=== step lru_ondemand $(date +%T)"
python bench/trace.py --out $R/two --policies lru_ondemand --sweep 50,100 --work /tmp/w_two --peer-copies $T > $R/lru.log 2>&1
echo "lru rc=$?"; trace_results $R/two
echo "=== step overhead $(date +%T)"
for i in 1 2; do
  timeout 120 python bench/overhead.py --out $R/ov/$i --requests 3000 --warmup 300 --seconds 3 --spin-ms 1 \
    --devices cuda:0 > $R/ov_$i.log 2>&1
  overhead_results $R/ov/$i || echo "RUN ov $i failed"
done
echo "=== step one gpu $(date +%T)"
python bench/trace.py --out $R/one --policies swapserve --sweep 400 --devices cuda:0 --work /tmp/w_one $T > $R/one.log 2>&1
echo "one rc=$?"; trace_results $R/one
echo "=== all done $(date +%T)"
