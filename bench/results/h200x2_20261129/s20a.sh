#!/bin/bash
# Session 19, one lease of nvidia-h200-x2 (~25 min): (1) the two-GPU trace, swapserve at N = 400/600/800 (two
# replays each, peer copies on, no fronts) on the current defaults (the controller polls: spin 1); (2) LRU on-demand
# at N = 50/100 on both GPUs; (3) N = 800 again with four HTTP fronts; (4) if time is left, one GPU (cuda:0) at
# N = 400 with queue_ahead_within_ms null and 2 alternating, four replays. Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nvidia-smi topo -m; nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
T="--duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO"
echo "=== step trace swapserve 400-800, two GPUs $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 400,600,800 --repeats 2 --peer-copies $T > $R/swapserve.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -8
echo "=== step trace lru_ondemand 50,100 $(date +%T)"
python bench/trace.py --out $R/sweep --policies lru_ondemand --sweep 50,100 $T > $R/lru.log 2>&1
grep -i "attain\|ready\|error" $R/lru.log | tail -5
echo "=== step trace swapserve 800, four fronts $(date +%T)"
python bench/trace.py --out $R/fronts4 --policies swapserve --sweep 800 --repeats 2 --peer-copies --fronts 4 $T > $R/fronts4.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/fronts4.log | tail -5
echo "=== step one GPU N=400, queue_ahead_within_ms null/2 $(date +%T)"
python bench/trace.py --out $R/qa --devices cuda:0 --policies swapserve --sweep 400 --repeats 4 \
  --alternate queue_ahead_within_ms=null,2 $T > $R/qa.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/qa.log | tail -6
echo "=== all done $(date +%T)"
