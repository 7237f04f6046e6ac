#!/bin/bash
# Session 21 (2026-11-30), one lease of nvidia-h200-x2 (~10 min), code 59df993: (1) the two-GPU tests (peer
# copies, a worker started again on a node of two devices, the multi-device node) at this code: session 20's
# later scheduler change (2521429), the host fallback (f7170f0) and the workers' heap freeze (59df993) ran on
# CPU only; (2) two GPUs at N = 800, one replay, with the workers' heaps frozen and every collection of 10 ms
# or more logged. Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
cp .whl/s22b.sh $R/
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; git log --oneline -1; } > $R/machine.txt 2>&1; cat $R/machine.txt
echo "=== step gpu tests $(date +%T)"
PYTHONPATH=$PWD timeout 400 python -m pytest -q -p no:cacheprovider -rs tests/integration/test_peer_copies.py \
  tests/integration/test_worker_restart.py tests/integration/test_multi_device.py > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -12 $R/gpu_tests.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve 800, two GPUs $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 800 --peer-copies $T > $R/swapserve.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -8
echo "=== heap"; grep -h "objects frozen\|garbage collection" $R/sweep/*.log | tail -20
python - <<'PY'
import json
d = json.load(open('/tmp/res4/sweep/trace.json'))
p = d['policies']['swapserve']['sweep'][0]
print('RESULT attainment', p['attainment'], 'in_slo', p['requests_in_slo'], 'p50', p['p50_ms'], 'p99', p['p99_ms'],
      'longest_run', p.get('longest_run_ms'), 'canary', p.get('cpu_canary', {}).get('median_ms'), 'miss', p.get('miss_causes', {}).get('worst_part'))
PY
echo "=== all done $(date +%T)"
