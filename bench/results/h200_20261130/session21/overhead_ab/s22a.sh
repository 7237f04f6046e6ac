#!/bin/bash
# Session 21 (2026-11-30), one H200: bench/overhead.py at this session's start code (new, dedffdf) against
# 021cf34 (old, session 19's end, carried in .whl/old), twelve runs in the order new old old new repeated three
# times, spin 1. Every result is printed into the log; all JSON is tarred into one file.
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res4; mkdir -p $R/ab
exec > $R/session.log 2>&1
cp .whl/s22a.sh $R/
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > $R/machine.txt
lscpu | grep -E 'Model name|^CPU\(s\)|MHz' >> $R/machine.txt
git log --oneline -1 >> $R/machine.txt
i=0
for v in new old old new new old old new new old old new; do
  i=$((i+1)); b=bench/overhead.py; [ $v = old ] && b=.whl/old/bench/overhead.py
  timeout 80 python $b --out $R/ab/${i}_$v --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 > $R/ab/${i}_$v.log 2>&1
  python -c "
import json; d=json.load(open('$R/ab/${i}_$v/overhead.json'))
print('RUN $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'stdlib', round(d['p50_overhead_ms_stdlib_client'],3), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})
print('  phases', {k: round(x,3) for k,x in d.get('p50_run_phases_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== all done"
