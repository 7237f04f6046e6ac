#!/bin/bash
# Session 20, one lease of nvidia-h200 (~20 min): (1) the GPU tests of session 19's fixes — the engine (its stress of
# placing ahead beside a fetching side lane, cuda eager and graph), a lost device (the worker exits), the node
# stress (every answer its own model's) and answers in the slab; (2) one GPU at N = 400, queue_ahead_within_ms null
# against 2, four replays (the A/B that session 19's lost CUDA context ended); (3) if time is left, the headline
# sweep on the current defaults. Results in /tmp/res4 (poll.sh tars it into $OUT).
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
echo "=== step gpu tests $(date +%T)"
PYTHONPATH=$PWD timeout 420 python -m pytest -q -p no:cacheprovider tests/unit/test_engine.py tests/integration/test_device_lost.py \
  tests/integration/test_node_stress.py tests/integration/test_answers_in_slab.py > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -6 $R/gpu_tests.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step one GPU N=400, queue_ahead_within_ms null/2 $(date +%T)"
python bench/trace.py --out $R/qa --policies swapserve --sweep 400 --repeats 4 --alternate queue_ahead_within_ms=null,2 $T > $R/qa.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/qa.log | tail -6
echo "=== step trace swapserve 300-450 $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 300,400,450 $T > $R/swapserve.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -6
echo "=== all done $(date +%T)"
