#!/bin/bash
# Session 31, the lease's remaining minutes: three more overhead pairs, base first this time.
set -u
source bench/lease.sh .whl/s32b.sh; R=$LEASE_RESULTS
rm -rf /tmp/base30; cp -r "$OLDPWD/.whl/base30" /tmp/base30
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 4 5 6; do
  for code in base new; do
    echo "=== step overhead $code $i $(date +%T)"
    if [ $code = new ]; then dir=$PWD; else dir=/tmp/base30; fi
    (cd $dir && PYTHONPATH=$dir timeout 120 python bench/overhead.py --out $R/ov/${code}_$i $OV > $R/ov_${code}_$i.log 2>&1)
    echo "ov rc=$?"; overhead_results $R/ov/${code}_$i
  done
done
echo "=== all done $(date +%T)"
