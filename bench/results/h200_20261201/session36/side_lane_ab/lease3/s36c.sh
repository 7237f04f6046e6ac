#!/usr/bin/env bash
W=$(pwd)
source bench/lease.sh .whl/s36c.sh; R=$LEASE_RESULTS
mkdir -p /tmp/base && cp -r "$W/.whl/base/." /tmp/base/
git -C "$W" diff --stat > $R/diff_stat.txt 2>/dev/null
ov() {  # ov NAME TREE
  echo "=== $(date +%T) overhead $1"
  (cd "$2" && PYTHONPATH="$2" timeout 75 python bench/overhead.py --out $R/ov/$1 --devices cuda:0 --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 > $R/ov/$1.log 2>&1)
  overhead_results $R/ov/$1
}
mkdir -p $R/ov
ov new_1 /tmp/tree; ov base_1 /tmp/base; ov base_2 /tmp/base; ov new_2 /tmp/tree; ov new_3 /tmp/tree; ov base_3 /tmp/base
echo "=== $(date +%T) gpu tests"
timeout 230 python -m pytest -m gpu -q -p no:cacheprovider tests > $R/gpu_tests.txt 2>&1; echo "rc=$?"
tail -5 $R/gpu_tests.txt
echo "=== all done"
