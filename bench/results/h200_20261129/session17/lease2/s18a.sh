#!/bin/bash
# Session 17, lease 2 (~11 min): (1) the answers-from-the-slab test on the GPU; (2) the swapserve sweep
# 100-400 with the canary started before each point's trace (not at its measured start), the gateway's margin
# alternating on one node (two replays a point, order alternating from point to point), raw records kept.
# Results in /tmp/res4 (poll.sh tars it into $OUT).
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
echo "=== step gpu test $(date +%T)"
PYTHONPATH=$PWD timeout 200 python -m pytest -q -p no:cacheprovider tests/integration/test_answers_in_slab.py > $R/gpu_tests.txt 2>&1
tail -3 $R/gpu_tests.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
echo "=== step sweep, margin alternating $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 100,200,300,400 --duration 30 --warmup 5 --raw \
  --repeats 2 --alternate gateway_margin=false,true --work /tmp/trace-work --slo-from $SLO > $R/sweep.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/sweep.log | tail -14
echo "=== all done $(date +%T)"
