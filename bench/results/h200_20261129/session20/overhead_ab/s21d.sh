#!/bin/bash
# Session 20, the same warm nvidia-h200 lease right after s21c.sh: bench/overhead.py at this session's code (new)
# and at 021cf34, session 19's end (old, a copy carried in .whl/old), order new old old new, spin 1.
set -u
export PYTHONUNBUFFERED=1
cp .whl/s21d.sh $OUT/
i=0
for v in new old old new; do
  i=$((i+1)); b=bench/overhead.py; [ $v = old ] && b=.whl/old/bench/overhead.py
  timeout 75 python $b --out $OUT/ab/${i}_$v --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 > $OUT/ab_${i}_$v.log 2>&1
  python -c "
import json; d=json.load(open('$OUT/ab/${i}_$v/overhead.json'))
print('$i $v', round(d['p50_overhead_ms'],3), round(d['p99_overhead_ms'],3), round(d['max_rps']), d.get('cpu_canary',{}).get('median_ms'))"
done
