#!/bin/bash
# Session 24 (2026-11-30), one lease of nvidia-h200-x2, code = this tree (main + the margin counting read_ms):
# (1) two GPUs at N = 800, one pair by bench/code_ab.sh at the benchmark's max batch 4, peer copies, 30 s: this
# code against 04b8a0f (main before the margin change); (2) one replay of this code with --fronts 2, same trace.
# Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
S=/tmp/s25; rm -rf $S; mkdir -p $S; cp -r swapserve bench tests pyproject.toml examples .whl/base .whl/s25a.sh $S/
cp .whl/s25a.sh $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; lscpu | grep "Model name"; git log --oneline -1; } > $R/machine.txt 2>&1; cat $R/machine.txt
cd $S; export PYTHONPATH=$S
summary() { python - "$@" <<'PY'
import json, sys
for d in sys.argv[1:]:
    p = json.load(open(d + '/trace.json'))['policies']['swapserve']['sweep'][0]
    print('RESULT', d.split('/')[-1], 'attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'],
          'p99', p['p99_ms'], 'canary', p.get('cpu_canary', {}).get('median_ms'), 'miss', p.get('miss_causes', {}).get('worst_part'))
PY
}
echo "=== step code_ab 800 $(date +%T)"
MAX_BATCH=4 DURATION=30 TRACE_ARGS=--peer-copies bash bench/code_ab.sh $S/base $R/ab 800 1 > $R/code_ab.log 2>&1
echo "code_ab rc=$?"
grep -E "attainment|===" $R/code_ab.log | tail -12
cat $R/ab/paired.md 2>/dev/null | head -40
summary $R/ab/new_1 $R/ab/base_1
echo "=== step fronts2 800 $(date +%T)"
SLO=$(ls bench/results/h200_*/swap_latency.json | tail -1); cp $SLO /tmp/slo25.json
python bench/trace.py --out $R/fronts2 --work /tmp/w25 --policies swapserve --sweep 800 --duration 30 --warmup 5 \
  --max-batch 4 --raw --peer-copies --fronts 2 --slo-from /tmp/slo25.json > $R/fronts2.log 2>&1
echo "fronts2 rc=$?"
summary $R/fronts2
echo "=== all done $(date +%T)"
