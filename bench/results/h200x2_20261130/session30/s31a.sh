#!/bin/bash
# Written in session 29 for the next lease of nvidia-h200-x2 (~25 min; poll with bench/lease_poll.sh, at once after each call: the machine
# is given back 30 s after a call ends). The A/B of 7cc5559 (a model the first lane brings in counts from when its
# run ends; a side lane waits for it to land) and 1956645 (a side lane's resident run is sent only once its model
# is whole there, as the worker said) against the code before them (.whl/base29 = b9f73a1, f8c5588's
# swapserve/ and bench/ scripts): bench/code_ab.sh at N = 800 on two GPUs, two pairs, alternating order, then
# bench/paired.py per pair; then the GPU tests. Results in /tmp/res4 (tar it into $OUT from the poll).
set -u
source bench/lease.sh .whl/s31a.sh; R=$LEASE_RESULTS
BASE=/tmp/base; rm -rf $BASE; cp -r "$OLDPWD/.whl/base29" $BASE  # from the working tree (lease.sh cd-ed away)
echo "=== step ab $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--peer-copies" bash bench/code_ab.sh $BASE $R/ab 800 2 > $R/ab.log 2>&1
echo "ab rc=$?"
for d in $R/ab/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/ab/paired.md | head -12
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED|Error" | tail -6
echo "=== all done $(date +%T)"
