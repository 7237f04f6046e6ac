#!/bin/bash
# Session 26, second lease (nvidia-h200-x2, ~6 min), two things side by side on the two GPUs:
# (A) GPU 1: the device-lost GPU test, as restructured after s27a (its faulted worker's exit outlasted 60 s),
#     run with CUDA_VISIBLE_DEVICES=1 — the node's workers now see the GPU the node numbered among those it may
#     use (before: logical cuda:0 became physical GPU 0); nvidia-smi's compute apps say which GPU they ran on;
# (B) GPU 0: a node of 240 functions (N=240, one GPU, max batch 4, 20 s) with its host store on a tmpfs mounted
#     huge=within_size (SWAPSERVE_SHM_DIR): the start-up progress line's new split (a worker's first runs of
#     a model: swap in, graph capture) and the replay on 2 MiB pages.
set -u
source bench/lease.sh .whl/s27b.sh; R=$LEASE_RESULTS
nvidia-smi --query-gpu=index,uuid --format=csv,noheader > $R/gpus.txt; cat $R/gpus.txt
echo "=== step A+B $(date +%T)"
(CUDA_VISIBLE_DEVICES=1 timeout 330 python -m pytest -q -p no:cacheprovider -m gpu -rA --durations=3 \
   tests/integration/test_device_lost.py > $R/device_lost.txt 2>&1; echo "device_lost rc=$?" >> $R/device_lost.txt) &
A=$!
(for i in $(seq 1 60); do date +%T; nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader
   sleep 4; done > $R/apps.txt 2>&1) &
mkdir -p /mnt/huge && mount -t tmpfs -o size=120G,huge=within_size tmpfs /mnt/huge; grep /mnt/huge /proc/mounts
SLO=bench/results/h200_20261127/swap_latency.json
CUDA_VISIBLE_DEVICES=0 SWAPSERVE_SHM_DIR=/mnt/huge timeout 330 python bench/trace.py --out $R/huge240 \
  --policies swapserve --sweep 240 --duration 20 --warmup 5 --max-batch 4 --raw --work /tmp/w240 --slo-from $SLO \
  > $R/huge240.log 2>&1
echo "huge240 rc=$?"; grep -E "loaded .* of" $R/huge240/serve_swapserve.log 2>/dev/null | tail -4
python - <<'PY'
import json
d = json.load(open('/tmp/res4/huge240/trace.json'))
for p in d['policies']['swapserve']['sweep']:
    print('RESULT huge240 N', p['n'], 'attainment', p['attainment'], 'in_slo', p.get('requests_in_slo'),
          'p50', p['p50_ms'], 'p99', p['p99_ms'])
PY
wait $A; grep -v IndexKernelUtils $R/device_lost.txt | grep -E "passed|failed|PASSED|FAILED|^E  |s call|rc=" | head -12
echo "=== all done $(date +%T)"
