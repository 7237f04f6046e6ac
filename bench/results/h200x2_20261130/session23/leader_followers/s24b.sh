#!/bin/bash
# Session 23 (2026-11-30), second lease, nvidia-h200-x2, this tree (the worker's threads take turns reading:
# leader and followers, no hand-over to a lane's thread on a request's path) against 9f69ab9 (.whl/base2):
# (1) the GPU tests (all of -m gpu: engine, graphs, two-GPU node tests, the node stress test polling);
# (2) bench/overhead.py spin 1, four runs alternating new/base (N B B N) on one GPU;
# (3) two GPUs at N = 800 at trace.py's own max batch (code_ab ran max batch 1), peer copies on, one replay.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R/ov
exec > >(tee -a $R/session.log) 2>&1
S=/tmp/s24; rm -rf $S; mkdir -p $S; cp -r swapserve bench tests pyproject.toml examples $S/; cp -r .whl/base2 $S/base
cp .whl/s24b.sh $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nvidia-smi topo -m; nproc; free -g
  lscpu | grep "Model name"; } > $R/machine.txt 2>&1
cd $S
echo "=== step gpu tests $(date +%T)"
PYTHONPATH=$S timeout 330 python -m pytest -q -p no:cacheprovider -rs -m gpu tests > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -4 $R/gpu_tests.txt
echo "=== step overhead $(date +%T)"
i=0
for v in N B B N; do
  i=$((i+1)); tree=$S; [ $v = B ] && tree=$S/base
  (cd $tree && PYTHONPATH=$tree timeout 90 python bench/overhead.py --out $R/ov/${i}_$v --requests 3000 --warmup 300 --seconds 3 --spin-ms 1 --devices cuda:0 > $R/ov/${i}_$v.log 2>&1)
  python -c "
import json; d=json.load(open('$R/ov/${i}_$v/overhead.json'))
print('RUN $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== step trace swapserve 800, two GPUs, default max batch $(date +%T)"
export PYTHONPATH=$S
python bench/trace.py --out $R/sweep --policies swapserve --sweep 800 --peer-copies --duration 30 --warmup 5 --raw \
  --work /tmp/trace-work --slo-from $S/bench/results/h200_20261127/swap_latency.json > $R/swapserve.log 2>&1
grep -i "attain\|error\|not run" $R/swapserve.log | tail -5
python - <<'PY'
import json
d = json.load(open('/tmp/res4/sweep/trace.json'))
p = d['policies']['swapserve']['sweep'][0]
print('RESULT attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'], 'p99', p['p99_ms'],
      'canary', p.get('cpu_canary', {}).get('median_ms'), 'remaps/swap', p.get('remaps_per_swap'), 'unmaps/swap', p.get('remap_unmaps_per_swap'),
      'miss', p.get('miss_causes', {}).get('worst_part'))
PY
echo "=== all done $(date +%T)"
