#!/bin/bash
# Session 26 (2026-11-30), one lease of nvidia-h200-x2: the scheduler's device tie-break (675878a, 1880859) on two
# GPUs. (1) the sweep N = 400/600/800 at this tree (HEAD 334eaf0, no fronts; max batch 4, peer copies, 30 s);
# (2) the same sweep at 6effed7 (main before the tie-break; .whl/base), same seed: bench/paired.py pairs each
# point request by request; (3) LRU on-demand 50/100 at this tree into (1)'s trace.json; (4) the GPU tests.
# Results in /tmp/res4.
set -u
source bench/lease.sh .whl/s27a.sh; R=$LEASE_RESULTS
BASE=/tmp/base; rm -rf $BASE; cp -r "$OLDPWD/.whl/base" $BASE  # from the working tree (lease.sh cd-ed away)
summary() { python - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + '/trace.json'))
for pol, v in d['policies'].items():
    for p in v['sweep']:
        print('RESULT', sys.argv[1].split('/')[-1], pol, 'N', p["n"], 'attainment', p['attainment'],
              'in_slo', p.get('requests_in_slo'), 'p50', p['p50_ms'], 'p99', p['p99_ms'],
              'by_device', {k: v.get('swaps') for k, v in (p.get('by_device') or {}).items()})
PY
}
SLO=bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --max-batch 4 --raw --peer-copies --slo-from $PWD/$SLO"
echo "=== step sweep new $(date +%T)"
python bench/trace.py --out $R/new --policies swapserve --sweep 400,600,800 --work /tmp/w_new $T > $R/new.log 2>&1
echo "new rc=$?"; grep -E "loaded .* of|stopped" $R/new.log | tail -3
summary $R/new
echo "=== step sweep base $(date +%T)"
(cd $BASE && PYTHONPATH=$BASE python bench/trace.py --out $R/base --policies swapserve --sweep 400,600,800 \
   --work /tmp/w_base $T > $R/base.log 2>&1; echo "base rc=$?")
grep -E "loaded .* of|stopped" $R/base.log | tail -3
summary $R/base
python bench/paired.py $R/base $R/new --exclude gpt2-medium > $R/paired.md 2>&1; head -24 $R/paired.md
echo "=== step lru_ondemand $(date +%T)"
python bench/trace.py --out $R/new --policies lru_ondemand --sweep 50,100 --work /tmp/w_new $T > $R/lru.log 2>&1
echo "lru rc=$?"
summary $R/new
echo "=== step gpu tests $(date +%T)"
timeout 200 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; grep -v IndexKernelUtils $R/gpu_tests.txt | tail -8
echo "=== all done $(date +%T)"
