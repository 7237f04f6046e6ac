#!/bin/bash
# Session 15, third lease: the gateway margin on/off (the order reversed) at N=400 (order-balanced alternation on one node), with
# side fetches and placing ahead on (the new defaults); code from .whl/code15 (git archive of 7589de6).
set -u
ROOTDIR=$PWD
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
mount -o remount,size=110G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
rm -rf /tmp/code && cp -r .whl/code15 /tmp/code && cd /tmp/code && export PYTHONPATH=/tmp/code
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SLO=$ROOTDIR/bench/results/h200_20261127/swap_latency.json
AB=gateway_margin
echo "=== step $AB A/B $(date +%T)"
timeout 540 python bench/trace.py --out $R/$AB --policies swapserve --sweep 400 --duration 20 --warmup 5 --max-batch 4 --raw --repeats 4 --alternate $AB=true,false --slo-from $SLO > $R/$AB.log 2>&1; grep -i "attain\|error" $R/$AB.log | tail -8
for d in $R/$AB/${AB}_*/; do echo "-- $d"; python bench/miss_causes.py $d/trace.json | cut -c1-300; done
python bench/estimates.py $R/$AB/${AB}_* > $R/$AB/estimates.md; grep -A7 "runs of" $R/$AB/estimates.md
python bench/followers.py $R/$AB/${AB}_*/trace.json > $R/$AB/followers.md
head -20 $R/$AB/paired.md
echo "=== all done $(date +%T)"
tar czf $OUT/res4.tgz -C /tmp res4
