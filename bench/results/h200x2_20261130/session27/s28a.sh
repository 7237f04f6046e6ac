#!/bin/bash
# Session 27 plan (prepared in session 26), one lease of nvidia-h200-x2, this tree = main. Branch trees carried:
#   .whl/lanespin      git archive lane-spin swapserve bench | tar -x -C .whl/lanespin --exclude=bench/results
#   .whl/valuerefresh  the same for value-refresh, plus bench/results/h200_20261127/swap_latency.json (the SLOs)
# (1) the GPU tests (test_visible_gpus.py on two GPUs for the first time); (2) bench/overhead.py on cuda:0,
# spin 1, alternating lane-spin (L) and main (M): L M M L; (3) value-refresh against main at N = 800 on both
# GPUs, one pair (bench/code_ab.sh from the branch's tree, main as BASE): main's second replay at 800 too.
set -u
source bench/lease.sh .whl/s28a.sh; R=$LEASE_RESULTS
L=/tmp/lanespin; rm -rf $L; cp -r "$OLDPWD/.whl/lanespin" $L
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | grep -E "passed|failed|FAILED" | tail -6
echo "=== step overhead $(date +%T)"; mkdir -p $R/ov; i=0
for v in L M M L; do
  i=$((i+1)); tree=$PWD; [ $v = L ] && tree=$L
  (cd $tree && PYTHONPATH=$tree timeout 120 python bench/overhead.py --out $R/ov/${i}_$v --requests 3000 --warmup 300 \
     --seconds 3 --spin-ms 1 --devices cuda:0 > $R/ov/${i}_$v.log 2>&1)
  python -c "
import json; d=json.load(open('$R/ov/${i}_$v/overhead.json'))
print('RESULT ov $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== step value-refresh A/B $(date +%T)"
V=/tmp/valuerefresh; rm -rf $V; cp -r "$OLDPWD/.whl/valuerefresh" $V
MAX_BATCH=4 DURATION=30 TRACE_ARGS=--peer-copies bash $V/bench/code_ab.sh $PWD $R/ab 800 1 > $R/ab.log 2>&1
echo "ab rc=$?"; for d in $R/ab/new_1 $R/ab/base_1; do trace_results $d; done; head -12 $R/ab/paired.md
echo "=== all done $(date +%T)"
