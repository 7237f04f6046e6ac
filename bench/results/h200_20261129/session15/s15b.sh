#!/bin/bash
# Session 15: on one node at N=400, max batch 4, order-balanced alternation (trace.py --alternate reverses
# every round): place_ahead off/on, then side_fetch off/on; miss causes, estimates, followers, late replies.
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
python -m pip install --no-index --no-deps --find-links .whl/pyspy py-spy 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
for AB in place_ahead side_fetch; do
  echo "=== step $AB A/B $(date +%T)"
  timeout 420 python bench/trace.py --out $R/$AB --policies swapserve --sweep 400 --duration 20 --warmup 5 --max-batch 4 --raw --repeats 4 --alternate $AB=false,true --slo-from bench/results/h200_20261127/swap_latency.json > $R/$AB.log 2>&1; grep -i "attain\|error" $R/$AB.log | tail -8
  for d in $R/$AB/${AB}_*/; do echo "-- $d"; python bench/miss_causes.py $d/trace.json | cut -c1-300; done
  python bench/estimates.py $R/$AB/${AB}_* > $R/$AB/estimates.md; grep -A7 "runs of" $R/$AB/estimates.md
  python bench/followers.py $R/$AB/${AB}_*/trace.json > $R/$AB/followers.md
  python bench/late_replies.py $R/$AB/${AB}_* > $R/$AB/late_replies.md; tail -8 $R/$AB/late_replies.md
  tar czf $OUT/res4.tgz -C /tmp res4 2>/dev/null
done
echo "=== all done $(date +%T)"
tar czf $OUT/res4.tgz -C /tmp res4
