#!/bin/bash
# Session 18, lease 2 (~7 min): (1) the swapserve trace at N = 400 again, four replays on one node, the controller's
# polling (spin_ms) 0 and 1 alternating: does N = 400 hold 98 % again on another machine, and what does a polling
# core cost the trace; (2) overhead.py with --spin-ms 1 and 0 on the same machine. Results in /tmp/res4.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm; lscpu | grep "Model name"; } > $R/machine.txt 2>&1; cat $R/machine.txt
rm -rf /tmp/sweep; mkdir -p /tmp/sweep; cp -r swapserve bench pyproject.toml examples /tmp/sweep/
cd /tmp/sweep; ROOT=$PWD; export PYTHONPATH=$ROOT
SLO=$ROOT/bench/results/h200_20261127/swap_latency.json
echo "=== step trace N=400, spin_ms alternating $(date +%T)"
python bench/trace.py --out $R/spin --policies swapserve --sweep 400 --duration 30 --warmup 5 --raw --repeats 4 \
  --alternate spin_ms=0,1 --work /tmp/trace-work --slo-from $SLO > $R/spin.log 2>&1
grep -i "attain\|ready\|error\|not run" $R/spin.log | tail -8
echo "=== step overhead spin 1/0 $(date +%T)"
for s in 1 0; do python bench/overhead.py --out $R/overhead_spin$s --requests 2000 --warmup 200 --seconds 3 --spin-ms $s > /dev/null 2>&1; done
grep -h "^| [0-9]" $R/overhead_spin*/overhead.md | head -4
echo "=== all done $(date +%T)"
