#!/bin/bash
# Written in session 31 for the next lease of nvidia-h200-x2 (~22 min; poll with bench/lease_poll.sh, at once
# after each call: the machine is given back 30 s after a call ends). Results in /tmp/res4.
# (1) the GPU tests; (2) bench/code_ab.sh at N = 800 on both GPUs, one pair: this tree against .whl/base33
#     (cb764a3: before d49813f, a copy with no run planned as its copy plus the node's learned copy overhead;
#     40b268b and 55777de, a lane past its expected end planned to go on as long again; and 2b19ff3, the
#     controller's stalls in the run log, which the new side's replays write to trace_raw/stalls/);
#     (3) the same A/B on one GPU at N = 400.
set -u
source bench/lease.sh .whl/s33a.sh; R=$LEASE_RESULTS
rm -rf /tmp/base33; cp -r "$OLDPWD/.whl/base33" /tmp/base33
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED|Error" | tail -6
echo "=== step ab 800 $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--peer-copies" bash bench/code_ab.sh /tmp/base33 $R/ab 800 1 > $R/ab.log 2>&1
echo "ab rc=$?"
for d in $R/ab/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/ab/paired.md | head -12
echo "=== step ab one gpu 400 $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--devices cuda:0" bash bench/code_ab.sh /tmp/base33 $R/one 400 1 > $R/one.log 2>&1
echo "one rc=$?"
for d in $R/one/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/one/paired.md | head -12
echo "=== all done $(date +%T)"
