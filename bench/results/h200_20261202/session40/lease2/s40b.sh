#!/bin/bash
# Session 40, lease 2 (one H200): bench/overhead.py three times on main's final code of the session (d753ed0).
set -u
source bench/lease.sh .whl/s40b.sh; R=$LEASE_RESULTS
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2 3; do
  echo "=== step overhead $i $(date +%T)"
  timeout 120 python bench/overhead.py --out $R/ov/$i $OV > $R/ov_$i.log 2>&1
  echo "ov rc=$?"; overhead_results $R/ov/$i
done
echo "=== all done $(date +%T)"
