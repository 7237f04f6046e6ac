#!/bin/bash
# Session 39, lease 3 (one H200): the GPU tests on main with the rate correction (149fe8e), then two overhead runs.
set -u
source bench/lease.sh .whl/s39c.sh; R=$LEASE_RESULTS
echo "=== step gpu tests $(date +%T)"
(cd /tmp/tree && timeout 300 python -m pytest -q -m gpu tests tests/integration/test_worker_lanes.py -p no:cacheprovider > $R/gpu_tests.txt 2>&1; echo "rc=$?" >> $R/gpu_tests.txt)
tail -3 $R/gpu_tests.txt
echo "=== step overhead x2 $(date +%T)"
mkdir -p $R/ov
for i in 1 2; do
  timeout 75 python bench/overhead.py --out $R/ov/$i --devices cuda:0 --requests 2000 --warmup 200 --seconds 1 --spin-ms 1 > $R/ov/$i.log 2>&1
  echo "overhead $i rc=$?"; overhead_results $R/ov/$i
done
echo "=== all done $(date +%T)"
