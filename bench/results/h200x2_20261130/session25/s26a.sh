#!/bin/bash
# Session 25 (2026-11-30), one lease of nvidia-h200-x2, code = this tree (HEAD 6effed7: shared profiles by model
# structure, the per-shape margin, the stop off the loop): (1) bench/host_pages.py, 4 KiB /dev/shm against a
# huge=within_size tmpfs; (2) the two-GPU sweep N = 400/600/800 with two HTTP fronts (max batch 4, peer copies,
# 30 s), then LRU on-demand 50/100 into the same trace.json; (3) the same sweep without fronts (same seed, so
# bench/paired.py pairs each point); (4) the GPU tests. Results in /tmp/res4.
set -u
source bench/lease.sh .whl/s26a.sh; R=$LEASE_RESULTS
summary() { python - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + '/trace.json'))
for pol, v in d['policies'].items():
    for p in v['sweep']:
        print('RESULT', sys.argv[1].split('/')[-1], pol, 'N', p["n"], 'attainment', p['attainment'],
              'in_slo', p.get('requests_in_slo'), 'p50', p['p50_ms'], 'p99', p['p99_ms'],
              'canary', p.get('cpu_canary', {}).get('median_ms'), 'miss', p.get('miss_causes', {}).get('worst_part'))
PY
}
echo "=== step host_pages $(date +%T)"
timeout 240 python bench/host_pages.py --out $R/host_pages --gib 8 --repeats 3 > $R/host_pages.log 2>&1
echo "host_pages rc=$?"; cat $R/host_pages/host_pages.md 2>/dev/null || tail -20 $R/host_pages.log
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --peer-copies --work /tmp/w26 --slo-from $SLO"
echo "=== step sweep fronts 2 $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 400,600,800 --fronts 2 $T > $R/sweep_swapserve.log 2>&1
echo "sweep rc=$?"; grep -E "ready|load|attain" $R/sweep_swapserve.log | tail -8
summary $R/sweep
echo "=== step lru_ondemand $(date +%T)"
python bench/trace.py --out $R/sweep --policies lru_ondemand --sweep 50,100 $T > $R/sweep_lru.log 2>&1
echo "lru rc=$?"
summary $R/sweep
echo "=== step sweep fronts 0 $(date +%T)"
python bench/trace.py --out $R/fronts0 --policies swapserve --sweep 400,600,800 $T > $R/fronts0.log 2>&1
echo "fronts0 rc=$?"
summary $R/fronts0
echo "=== step gpu tests $(date +%T)"
timeout 200 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -6 $R/gpu_tests.txt
echo "=== all done $(date +%T)"
