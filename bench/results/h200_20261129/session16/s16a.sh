#!/bin/bash
# Session 16 (planned in 15): the full one-GPU sweep (every policy) on the current code, side fetches and placing ahead on (the defaults), from a copy of the tree in /tmp/sweep
# (later device calls replace the working tree). Results in /tmp/res4 (poll.sh tars it into $OUT).
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
git -C "$OLDPWD" rev-parse HEAD 2>/dev/null
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
WORK=/tmp/trace-work; mkdir -p $WORK
S=$R/sweep
echo "=== step overhead $(date +%T)"
python bench/overhead.py --out $S --requests 2000 --warmup 200 --seconds 5 > $R/overhead.log 2>&1; tail -3 $S/overhead.md
T="--duration 30 --warmup 5 --raw --work $WORK --slo-from $SLO"
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 100,200,300,400,500 $T > $R/swapserve.log 2>&1; grep -i "attain\|ready\|error" $R/swapserve.log | tail -12
echo "=== step trace lru_ondemand $(date +%T)"
python bench/trace.py --out $S --policies lru_ondemand --sweep 25,50,100 $T > $R/lru.log 2>&1; grep -i "attain\|ready\|error" $R/lru.log | tail -8
echo "=== step trace fifo_lru, dedicated $(date +%T)"
python bench/trace.py --out $S --policies fifo_lru,dedicated --sweep 100,200 $T > $R/base.log 2>&1; grep -i "attain\|ready\|error" $R/base.log | tail -8
echo "=== all done $(date +%T)"
