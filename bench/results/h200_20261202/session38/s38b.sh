#!/usr/bin/env bash
# Session 38, lease 1: does compute's slow mode (and the worker's part doubling) follow the code or the lane?
# Alternating overhead runs of main (9d4bc79) and 23f9d39, both with main's overhead.py (by_lane).
W=$(pwd)
source bench/lease.sh .whl/s38b.sh; R=$LEASE_RESULTS
mkdir -p /tmp/base && cp -r "$W/.whl/base/." /tmp/base/ && cp /tmp/tree/bench/overhead.py /tmp/base/bench/overhead.py
ov() {  # ov NAME TREE
  echo "=== $(date +%T) overhead $1"
  (cd "$2" && PYTHONPATH="$2" timeout 75 python bench/overhead.py --out $R/ov/$1 --devices cuda:0 --requests 2000 --warmup 200 --seconds 1 --spin-ms 1 > $R/ov/$1.log 2>&1)
  overhead_results $R/ov/$1
  python -c "import json,sys; j=json.load(open(sys.argv[1])); print('compute', round(j['p50_compute_ms'],3), 'canary', j['cpu_canary'].get('p50_ms') if isinstance(j.get('cpu_canary'),dict) else j.get('cpu_canary'), 'by_lane', j.get('by_lane'))" $R/ov/$1/overhead.json
}
mkdir -p $R/ov
for i in 1 2 3 4 5 6; do if [ $((i % 2)) = 1 ]; then ov new_$i /tmp/tree; ov base_$i /tmp/base; else ov base_$i /tmp/base; ov new_$i /tmp/tree; fi; done
echo "=== all done"
