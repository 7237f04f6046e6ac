#!/usr/bin/env bash
W=$(pwd)
source bench/lease.sh .whl/s36a.sh; R=$LEASE_RESULTS
cp -r "$W/.whl/inst" /tmp/inst
for v in base eager base2 eager2; do
  e=0; case $v in eager*) e=1;; esac
  echo "== $v $(date +%T)"
  EAGER=$e PYTHONPATH=/tmp/inst timeout 150 python /tmp/inst/bench/ovq.py $R/$v cuda:0 6000 2>&1 | tail -3
  python /tmp/inst/bench/ovq_report.py $R/$v 2>&1 | tail -40
done
python -c "import sys; print(sys.version)"
echo "=== all done"
