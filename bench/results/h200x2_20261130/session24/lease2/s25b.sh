#!/bin/bash
# Session 24 (2026-11-30), second lease of nvidia-h200-x2, code = this tree (as s25a): one more replay of the
# N = 800 trace on two GPUs with --fronts 2 (max batch 4, peer copies, 30 s), a second point beside s25a's 0.987.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
S=/tmp/s25; rm -rf $S; mkdir -p $S; cp -r swapserve bench pyproject.toml .whl/s25b.sh $S/
cp .whl/s25b.sh $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; lscpu | grep "Model name"; git log --oneline -1; } > $R/machine.txt 2>&1; cat $R/machine.txt
cd $S; export PYTHONPATH=$S
echo "=== step fronts2 800 $(date +%T)"
SLO=$(ls bench/results/h200_*/swap_latency.json | tail -1); cp $SLO /tmp/slo25.json
python bench/trace.py --out $R/fronts2 --work /tmp/w25 --policies swapserve --sweep 800 --duration 30 --warmup 5 \
  --max-batch 4 --raw --peer-copies --fronts 2 --slo-from /tmp/slo25.json > $R/fronts2.log 2>&1
echo "fronts2 rc=$?"
python - $R/fronts2 <<'PY'
import json, sys
p = json.load(open(sys.argv[1] + '/trace.json'))['policies']['swapserve']['sweep'][0]
print('RESULT fronts2 attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'], 'p99', p['p99_ms'],
      'canary', p.get('cpu_canary', {}).get('median_ms'), 'miss', p.get('miss_causes', {}).get('worst_part'))
PY
echo "=== all done $(date +%T)"
