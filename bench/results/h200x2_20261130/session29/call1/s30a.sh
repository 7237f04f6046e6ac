#!/bin/bash
# Written in session 28 for the next lease of nvidia-h200-x2 (about 20 min; poll at once after each call: the
# machine is given back 30 s after a call ends). This tree = main at session 28's end (eviction values refreshed
# in slices). Results in /tmp/res4 (tar it into $OUT from the poll).
# (1) the two-GPU sweep 400/600/800 (max batch 4, peer copies, 30 s) then LRU on-demand 50/100 into one trace.json:
#     the day's headline, the fifth replay of N = 800 on the current scheduler; (2) one GPU, N = 400; (3) the GPU
#     tests (this session's changes are the scheduler's, CPU-tested; the node on GPUs last ran at 6f73d44).
set -u
source bench/lease.sh .whl/s30a.sh; R=$LEASE_RESULTS
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --slo-from $PWD/$SLO"
echo "=== step sweep $(date +%T)"
python bench/trace.py --out $R/two --policies swapserve --sweep 400,600,800 --work /tmp/w_two --peer-copies $T > $R/two.log 2>&1
echo "sweep rc=$?"; trace_results $R/two
echo "=== step lru_ondemand $(date +%T)"
python bench/trace.py --out $R/two --policies lru_ondemand --sweep 50,100 --work /tmp/w_two --peer-copies $T > $R/lru.log 2>&1
echo "lru rc=$?"; trace_results $R/two
echo "=== step one gpu $(date +%T)"
python bench/trace.py --out $R/one --policies swapserve --sweep 400 --devices cuda:0 --work /tmp/w_one $T > $R/one.log 2>&1
echo "one rc=$?"; trace_results $R/one
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED|Error" | tail -6
echo "=== all done $(date +%T)"
