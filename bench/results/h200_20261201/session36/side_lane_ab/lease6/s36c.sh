#!/usr/bin/env bash
W=$(pwd)
source bench/lease.sh .whl/s36c.sh; R=$LEASE_RESULTS
mkdir -p /tmp/base && cp -r "$W/.whl/base/." /tmp/base/
git -C "$W" diff --stat > $R/diff_stat.txt 2>/dev/null
ov() {  # ov NAME TREE
  echo "=== $(date +%T) overhead $1"
  (cd "$2" && PYTHONPATH="$2" timeout 75 python bench/overhead.py --out $R/ov/$1 --devices cuda:0 --requests 2000 --warmup 200 --seconds 1 --spin-ms 1 > $R/ov/$1.log 2>&1)
  overhead_results $R/ov/$1
}
mkdir -p $R/ov
for i in 1 2 3; do if [ $((i % 2)) = 1 ]; then ov new_$i /tmp/tree; ov base_$i /tmp/base; else ov base_$i /tmp/base; ov new_$i /tmp/tree; fi; done



echo "=== all done"
