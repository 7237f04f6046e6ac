#!/bin/bash
# Session 27, second lease (nvidia-h200-x2, GPU 0 only): request overhead of this tree (N: main with lane-spin,
# value-refresh, the slab's byte copies in and out, the keep-alive timer) against dedb76b (B, the session's start;
# carried as .whl/base27 = git archive dedb76b swapserve bench), N B B N.
set -u
source bench/lease.sh .whl/s28b.sh; R=$LEASE_RESULTS
B=/tmp/base27; rm -rf $B; cp -r "$OLDPWD/.whl/base27" $B
echo "=== step overhead $(date +%T)"; mkdir -p $R/ov; i=0
for v in N B B N; do
  i=$((i+1)); tree=$PWD; [ $v = B ] && tree=$B
  (cd $tree && PYTHONPATH=$tree timeout 120 python bench/overhead.py --out $R/ov/${i}_$v --requests 3000 --warmup 300 \
     --seconds 3 --spin-ms 1 --devices cuda:0 > $R/ov/${i}_$v.log 2>&1)
  python -c "
import json; d=json.load(open('$R/ov/${i}_$v/overhead.json'))
print('RESULT ov $i $v p50', round(d['p50_overhead_ms'],3), 'p99', round(d['p99_overhead_ms'],3), 'rps', round(d['max_rps']), 'canary', round(d.get('cpu_canary',{}).get('median_ms',0),3))
print('  parts', {k: round(x,3) for k,x in d.get('p50_parts_ms',{}).items()})" || echo "RUN $i $v failed"
done
echo "=== all done $(date +%T)"
