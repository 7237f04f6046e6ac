#!/bin/bash
# Session 39, lease 2 (one H200): the rate estimate corrected for a short history (this tree, uncommitted: the
# eviction values' λ is the decaying count divided by 1 - 2^(-T/60 s), T since the node began counting the
# function) against main 1d85472, each on a node of its own, the trace at N = 400 twice on each; SLOs measured
# by the first, reused by the second. Replay 0 has swapped 35-55 times more than replay 1 of the same trace on
# every node since session 35 (535-557 against 482-517): the young node's rates are a tenth to a third of the truth.
set -u
W=$PWD
source bench/lease.sh .whl/s39b.sh; R=$LEASE_RESULTS
mkdir -p /tmp/base && cp -r "$W/.whl/base/." /tmp/base/
T="--policies swapserve --sweep 400 --repeats 2 --duration 30 --warmup 5 --raw --work /tmp/trace-work"
echo "=== step new 400 x2, SLOs measured here $(date +%T)"
python bench/trace.py --out $R/new $T > $R/new.log 2>&1
echo "new rc=$?"; trace_results $R/new
echo "=== step base 400 x2 $(date +%T)"
(cd /tmp/base && PYTHONPATH=/tmp/base python bench/trace.py --out $R/base --slo-from $R/new/trace.json $T > $R/base.log 2>&1)
echo "base rc=$?"; trace_results $R/base
for v in new base; do python - $R/$v <<'PY'
import json, lzma, sys, glob
d = sys.argv[1]; t = json.load(open(d + "/trace.json")); slo = t["slo_ms"]
for f in sorted(glob.glob(d + "/trace_raw/swapserve_400_r*.jsonl.xz")):
    recs = [json.loads(l) for l in lzma.open(f)]
    miss = sum(1 for x in recs if x["status"] != 200 or x["latency_ms"] > slo[x["function"].split("-", 1)[1]])
    print("RESULT SWAPS", d.split("/")[-1], f.split("_")[-1][:2], sum(x["swapped"] for x in recs), "missed requests", miss)
PY
done
echo "=== all done $(date +%T)"
