#!/bin/bash
# Written in session 30 for the next lease of nvidia-h200-x2 (~23 min; poll with bench/lease_poll.sh, at once
# after each call: the machine is given back 30 s after a call ends). Results in /tmp/res4.
# (1) request overhead, this tree against the code before session 30's three pieces off the request path
#     (.whl/base30 = c69e2f3's swapserve/ and bench/), alternating, three pairs (the CI box: 0.489 against
#     0.519 ms p50); (2) the GPU tests; (3) bench/code_ab.sh at N = 800, one pair: this tree against
#     .whl/base32 (59136fa, before 9a76fd0: a swap in pieces holds its first lane's next turn; and e81c236: a
#     function's first answer moves its gateway margin from its shape's); (4) one GPU, N = 400, this tree.
set -u
source bench/lease.sh .whl/s32a.sh; R=$LEASE_RESULTS
rm -rf /tmp/base30 /tmp/base32; cp -r "$OLDPWD/.whl/base30" /tmp/base30; cp -r "$OLDPWD/.whl/base32" /tmp/base32
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --slo-from $PWD/$SLO"
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2 3; do
  for code in new base; do
    echo "=== step overhead $code $i $(date +%T)"
    if [ $code = new ]; then dir=$PWD; else dir=/tmp/base30; fi
    (cd $dir && PYTHONPATH=$dir timeout 120 python bench/overhead.py --out $R/ov/${code}_$i $OV > $R/ov_${code}_$i.log 2>&1)
    echo "ov rc=$?"; overhead_results $R/ov/${code}_$i
  done
done
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED|Error" | tail -6
echo "=== step ab $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--peer-copies" bash bench/code_ab.sh /tmp/base32 $R/ab 800 1 > $R/ab.log 2>&1
echo "ab rc=$?"
for d in $R/ab/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/ab/paired.md | head -12
echo "=== step one gpu $(date +%T)"
python bench/trace.py --out $R/one --policies swapserve --sweep 400 --devices cuda:0 --work /tmp/w_one $T > $R/one.log 2>&1
echo "one rc=$?"; trace_results $R/one
echo "=== all done $(date +%T)"
