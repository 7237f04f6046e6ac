#!/bin/bash
# Session 21 (2026-11-30), second lease of nvidia-h200-x2 (~6 min), code eb23303: two GPUs at N = 800 again,
# one replay, the same command as s22b.sh, with the machine's memory-management counters and pressure-stall
# totals sampled every 0.1 s (.whl/vmwatch.py): s22b's replay lost 42 requests to a ~1 s window in which both
# workers' runs and the client stalled (an input upload of 82 ms), with no collection in any of our processes.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
cp .whl/s22c.sh .whl/vmwatch.py $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; lscpu | grep "Model name"
  cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; cat /proc/sys/kernel/numa_balancing
  git log --oneline -1; } > $R/machine.txt 2>&1; cat $R/machine.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
python .whl/vmwatch.py $R/vmstat.jsonl $R/swapserve.log & W=$!
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve 800, two GPUs $(date +%T.%N)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 800 --peer-copies $T > $R/swapserve.log 2>&1
kill $W
grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -8
echo "=== heap"; grep -h "garbage collection" $R/sweep/*.log | tail -5
python - <<'PY'
import json
d = json.load(open('/tmp/res4/sweep/trace.json'))
p = d['policies']['swapserve']['sweep'][0]
print('RESULT attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'], 'p99', p['p99_ms'],
      'longest_run', p.get('longest_run_ms'), 'canary', p.get('cpu_canary', {}).get('median_ms'), 'miss', p.get('miss_causes', {}).get('worst_part'))
PY
echo "=== all done $(date +%T)"
