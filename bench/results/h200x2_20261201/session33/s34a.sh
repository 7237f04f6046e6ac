#!/bin/bash
# Session 33, one lease of nvidia-h200-x2 (~25 min; poll with bench/lease_poll.sh at once after each call).
# (1) bench/overhead.py four times on main (nothing on its path changed since session 31: today's machine);
# (2) bench/code_ab.sh at N = 800 on both GPUs, --peer-copies, both sides profiled (py-spy carried): main
#     (040322a: a lane overdue up to 2 ms planned to free now) against .whl/base33 (cb764a3, before session
#     31's scheduler changes); (3) the same A/B on one GPU at N = 400; (4) bench/overdue.py on the new sides.
set -u
source bench/lease.sh .whl/s34a.sh; R=$LEASE_RESULTS
rm -rf /tmp/base33; cp -r "$OLDPWD/.whl/base33" /tmp/base33
OV="--requests 2000 --warmup 200 --seconds 3 --spin-ms 1"
for i in 1 2 3 4; do
  echo "=== step overhead $i $(date +%T)"
  timeout 120 python bench/overhead.py --out $R/ov/new_$i $OV > $R/ov_$i.log 2>&1
  echo "ov rc=$?"; overhead_results $R/ov/new_$i
done
echo "=== step ab 800 $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--peer-copies --profile" bash bench/code_ab.sh /tmp/base33 $R/ab 800 1 > $R/ab.log 2>&1
echo "ab rc=$?"
for d in $R/ab/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/ab/paired.md | head -12
python bench/overdue.py $R/ab/new_1 > $R/overdue_800.md 2>&1; echo "overdue rc=$?"
echo "=== step ab one gpu 400 $(date +%T)"
DURATION=30 WARMUP=5 MAX_BATCH=4 TRACE_ARGS="--devices cuda:0" bash bench/code_ab.sh /tmp/base33 $R/one 400 1 > $R/one.log 2>&1
echo "one rc=$?"
for d in $R/one/*_*; do trace_results $d; done
grep -E "median|sign|only" $R/one/paired.md | head -12
python bench/overdue.py $R/one/new_1 > $R/overdue_400.md 2>&1; echo "overdue rc=$?"
echo "=== all done $(date +%T)"
