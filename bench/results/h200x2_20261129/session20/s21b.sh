#!/bin/bash
# Session 20, one lease of nvidia-h200-x2 (~12 min): (1) the two-GPU tests of this session's worker restart on a
# node of several devices (pages unmapped and shared anew; the other device serving meanwhile), the peer copies
# and the multi-device node; (2) if time is left, two GPUs at N = 800, one replay. Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
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
echo "=== all done $(date +%T)"
