#!/bin/bash
# Session 22 (2026-11-30), one H200: (1) the engine's and the pool's tests with their CUDA modes (the unmapper
# now works only while the device is idle); (2) bench/overhead.py, the worker polling after its answers (new,
# 27eb64f) against 474e1c8 (base, .whl/base), order new base base new, spin 1; (3) bench/code_ab.sh at N=400,
# one pair, new against base.
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res4; mkdir -p $R/ov
exec > $R/session.log 2>&1
cp .whl/s23c.sh $R/
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > $R/machine.txt
lscpu | grep -E 'Model name|^CPU\(s\)|MHz' >> $R/machine.txt
echo "=== step engine tests $(date -u +%T)"
timeout 200 python -m pytest -q -p no:cacheprovider tests/unit/test_engine.py tests/unit/test_pages.py > $R/engine_tests.log 2>&1; echo "tests rc=$?"
tail -2 $R/engine_tests.log
echo "=== step overhead $(date -u +%T)"
i=0
for v in new base base new; do
  i=$((i+1)); b=bench/overhead.py; [ $v = base ] && b=.whl/base/bench/overhead.py
  timeout 80 python $b --out $R/ov/${i}_$v --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 > $R/ov/${i}_$v.log 2>&1
  python -c "
import json; d=json.load(open('$R/ov/${i}_$v/overhead.json'))
print('RUN $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== step code_ab N=400 $(date -u +%T)"
timeout 430 bash bench/code_ab.sh .whl/base $R/ab 400 1 > $R/code_ab.log 2>&1; echo "code_ab rc=$?"
grep -E "latency|outside|the run|In SLO|===" $R/code_ab.log | tail -12
for f in $R/ab/*/serve_*.log; do [ -f $f ] && grep -HcE "garbage collection" $f; grep -HE "did not stop|Traceback|unmapping" $f | head -5; done
echo "=== all done $(date -u +%T)"
