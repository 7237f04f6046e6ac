#!/usr/bin/env bash
W=$(pwd)
source bench/lease.sh .whl/s38a.sh; R=$LEASE_RESULTS
mkdir -p /tmp/base && cp -r "$W/.whl/base/." /tmp/base/
echo "=== $(date +%T) gpu tests"
(cd /tmp/tree && timeout 300 python -m pytest -q -m gpu tests tests/integration/test_worker_lanes.py -p no:cacheprovider > $R/gpu_tests.txt 2>&1; echo "rc=$?" >> $R/gpu_tests.txt)
tail -3 $R/gpu_tests.txt
echo "=== $(date +%T) scheduler cost"
for t in new:/tmp/tree base:/tmp/base; do
  (cd ${t#*:} && PYTHONPATH=${t#*:} timeout 60 python bench/scheduler_cost.py --devices 1 --functions 1 --resident 1 --partial 0 --out $R/sched_${t%%:*}_1fn.json > $R/sched_${t%%:*}_1fn.log 2>&1; tail -4 $R/sched_${t%%:*}_1fn.log)
done
ov() {  # ov NAME TREE
  echo "=== $(date +%T) overhead $1"
  (cd "$2" && PYTHONPATH="$2" timeout 75 python bench/overhead.py --out $R/ov/$1 --devices cuda:0 --requests 2000 --warmup 200 --seconds 1 --spin-ms 1 > $R/ov/$1.log 2>&1)
  overhead_results $R/ov/$1
}
mkdir -p $R/ov
for i in 1 2 3 4; do if [ $((i % 2)) = 1 ]; then ov new_$i /tmp/tree; ov base_$i /tmp/base; else ov base_$i /tmp/base; ov new_$i /tmp/tree; fi; done
echo "=== all done"
