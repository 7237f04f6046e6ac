#!/bin/bash
# Session 17 (planned in 16): one lease, ~17 min. (1) overhead with --spin-ms 0/1/1/0 (controller-only polling
# since 3c32698); (2) the swapserve sweep 100-450 on the current code (large answers sent from the slab, 78a431b;
# freed memory kept; N=450 fits 125 GiB, 500 does not); (3) the gateway margin A/B at N=400, order-balanced.
# Results in /tmp/res4 (poll.sh tars it into $OUT).
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
W="--work /tmp/trace-work --slo-from $SLO"
echo "=== step overhead spin 0/1/1/0 $(date +%T)"
for s in 0 1 1 0; do python bench/overhead.py --out $R/overhead_spin${s}_$RANDOM --requests 2000 --warmup 200 --seconds 3 --spin-ms $s > /dev/null 2>&1; done
grep -h "^| [0-9]" $R/overhead_spin*/overhead.md | head -8
echo "=== step trace swapserve $(date +%T)"
python bench/trace.py --out $R/sweep --policies swapserve --sweep 100,200,300,400,450 --duration 30 --warmup 5 --raw $W > $R/swapserve.log 2>&1; grep -i "attain\|ready\|error\|not run" $R/swapserve.log | tail -12
echo "=== step margin A/B $(date +%T)"
python bench/trace.py --out $R/margin --policies swapserve --sweep 400 --duration 20 --warmup 5 --raw --repeats 4 --alternate gateway_margin=false,true $W > $R/margin.log 2>&1; grep -i "attain\|ready\|error" $R/margin.log | tail -8
echo "=== all done $(date +%T)"
