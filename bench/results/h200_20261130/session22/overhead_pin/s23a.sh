#!/bin/bash
# Session 22 (2026-11-30), one H200: (1) the GPU tests at this code (per-model heap settle, stack dump);
# (2) bench/overhead.py unpinned (U) against pinned (P: --server-cpus 0-7 --client-cpus 8-15), twelve runs in the
# order U P P U repeated three times, spin 1, with every thread's CPU sampled each second meanwhile.
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res4; mkdir -p $R/ab
exec > $R/session.log 2>&1
cp .whl/s23a.sh $R/
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > $R/machine.txt
lscpu >> $R/machine.txt; lscpu -e >> $R/machine.txt
for c in /sys/devices/system/cpu/cpu[0-9]*; do echo "$(basename $c) siblings $(cat $c/topology/thread_siblings_list) core $(cat $c/topology/core_id) pkg $(cat $c/topology/physical_package_id)"; done >> $R/machine.txt
numactl -H >> $R/machine.txt 2>&1
echo "=== tests"
timeout 420 python -m pytest -q -m gpu -p no:cacheprovider tests > $R/gpu_tests.log 2>&1; echo "tests rc=$?"
tail -5 $R/gpu_tests.log
i=0
for v in U P P U U P P U U P P U; do
  i=$((i+1)); pin=""; [ $v = P ] && pin="--server-cpus 0-7 --client-cpus 8-15"
  ( while true; do echo "--- $(date +%s.%N)"; ps -eLo pid,tid,psr,pcpu,comm --sort=-pcpu | head -25; sleep 1; done ) > $R/ab/${i}_$v.threads 2>&1 &
  S=$!
  timeout 80 python bench/overhead.py --out $R/ab/${i}_$v --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 $pin > $R/ab/${i}_$v.log 2>&1
  kill $S
  python -c "
import json; d=json.load(open('$R/ab/${i}_$v/overhead.json'))
print('RUN $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'stdlib', round(d['p50_overhead_ms_stdlib_client'],3), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3), 'cpus', d.get('server_cpus'), d.get('client_cpus'))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== all done"
