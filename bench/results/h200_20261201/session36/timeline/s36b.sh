#!/usr/bin/env bash
W=$(pwd)
source bench/lease.sh .whl/s36b.sh; R=$LEASE_RESULTS
cp -r "$W/.whl/inst" /tmp/inst
for v in t1 t2; do
  echo "== $v $(date +%T)"
  PYTHONPATH=/tmp/inst timeout 150 python /tmp/inst/bench/ovq.py $R/$v cuda:0 6000 2>&1 | tail -3
  python /tmp/inst/bench/ovq_report.py $R/$v 2>&1 | tail -60
done
echo "=== all done"
