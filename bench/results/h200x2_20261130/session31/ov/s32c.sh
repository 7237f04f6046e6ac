#!/bin/bash
# Session 31: is the new tree's slow canary in overhead.py the code or where it ran from? Both codes from /tmp.
set -u
source bench/lease.sh .whl/s32c.sh; R=$LEASE_RESULTS
rm -rf /tmp/base30 /tmp/new; cp -r "$OLDPWD/.whl/base30" /tmp/base30; mkdir /tmp/new; cp -r swapserve bench /tmp/new/
OV="--requests 2000 --warmup 200 --seconds 2 --spin-ms 1"
for i in 7 8; do
  for code in new base; do
    echo "=== step overhead $code $i $(date +%T)"
    dir=/tmp/$code; [ $code = base ] && dir=/tmp/base30
    (cd $dir && PYTHONPATH=$dir timeout 100 python bench/overhead.py --out $R/ov/${code}_$i $OV > $R/ov_${code}_$i.log 2>&1)
    echo "ov rc=$?"; overhead_results $R/ov/${code}_$i
  done
done
echo "=== all done $(date +%T)"
