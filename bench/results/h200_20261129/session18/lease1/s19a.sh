#!/bin/bash
# Session 18, lease 1 (~18 min): (1) the engine's tests on the GPU, the place-ahead fix (85dc6f9) among them, and
# the answers-in-slab test; (2) the headline one-GPU sweep, every policy, on the current defaults (the gateway's
# margin on since f47940b; the place-ahead fix): swapserve N = 100-450, lru_ondemand 25/50/100, fifo_lru and
# dedicated 100/200; raw records kept. Results in /tmp/res4 (poll.sh tars it into $OUT).
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
echo "=== step gpu tests $(date +%T)"
PYTHONPATH=$PWD timeout 300 python -m pytest -q -p no:cacheprovider tests/unit/test_engine.py tests/integration/test_answers_in_slab.py > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -4 $R/gpu_tests.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
S=$R/sweep; T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 100,200,300,400,450 $T > $R/swapserve.log 2>&1; grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -12
echo "=== step trace lru_ondemand $(date +%T)"
python bench/trace.py --out $S --policies lru_ondemand --sweep 25,50,100 $T > $R/lru.log 2>&1; grep -i "attain\|ready\|error" $R/lru.log | tail -8
echo "=== step trace fifo_lru, dedicated $(date +%T)"
python bench/trace.py --out $S --policies fifo_lru,dedicated --sweep 100,200 $T > $R/base.log 2>&1; grep -i "attain\|ready\|error" $R/base.log | tail -8
echo "=== all done $(date +%T)"
