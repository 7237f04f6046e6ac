#!/bin/bash
# Session 16: the swapserve sweep (100-400) on the current code, side fetches and placing ahead on (the defaults),
# after s16a's swapserve node, sized for N=500 (a 124 GB host store on 125 GiB), lost its worker. trace.py now
# leaves out what does not fit host memory. Results in /tmp/res4 (poll.sh tars it into $OUT).
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
S=$R/sweep
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $S --policies swapserve --sweep 100,200,300,400 --duration 30 --warmup 5 --raw --work /tmp/trace-work --slo-from $SLO > $R/swapserve.log 2>&1; grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -12
echo "=== all done $(date +%T)"
