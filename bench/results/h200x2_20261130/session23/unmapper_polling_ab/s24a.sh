#!/bin/bash
# Session 23 (2026-11-30), one lease of nvidia-h200-x2, code d47ecfa + code_ab's TRACE_ARGS: (1) the two-GPU
# tests (peer copies, worker restart, the multi-device node, the node stress test asleep and polling) at this
# code: session 22's worker polling and idle unmapper ran on one GPU only; (2) two GPUs at N = 800, one pair,
# this code against 474e1c8 (before session 22) by bench/code_ab.sh, peer copies on, 30 s. Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
S=/tmp/s24; rm -rf $S; mkdir -p $S; cp -r swapserve bench tests pyproject.toml examples .whl/base .whl/s24a.sh $S/
cp .whl/s24a.sh $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; lscpu | grep "Model name"; git log --oneline -1; } > $R/machine.txt 2>&1; cat $R/machine.txt
cd $S; export PYTHONPATH=$S
echo "=== step gpu tests $(date +%T)"
timeout 300 python -m pytest -q -p no:cacheprovider -rs tests/integration/test_peer_copies.py \
  tests/integration/test_worker_restart.py tests/integration/test_multi_device.py tests/integration/test_node_stress.py -m gpu > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -12 $R/gpu_tests.txt
echo "=== step code_ab 800 $(date +%T)"
DURATION=30 TRACE_ARGS=--peer-copies bash bench/code_ab.sh $S/base $R/ab 800 1 > $R/code_ab.log 2>&1
echo "code_ab rc=$?"
grep -E "attainment|===" $R/code_ab.log | tail -12
cat $R/ab/paired.md 2>/dev/null | head -40
for d in $R/ab/new_1 $R/ab/base_1; do python - "$d" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + '/trace.json'))
p = d['policies']['swapserve']['sweep'][0]
print('RESULT', sys.argv[1].split('/')[-1], 'attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'], 'p99', p['p99_ms'],
      'canary', p.get('cpu_canary', {}).get('median_ms'), 'remaps/swap', p.get('remaps_per_swap'), 'unmaps/swap', p.get('remap_unmaps_per_swap'),
      'miss', p.get('miss_causes', {}).get('worst_part'))
PY
done
echo "=== all done $(date +%T)"
