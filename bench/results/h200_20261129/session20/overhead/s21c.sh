#!/bin/bash
# Session 20, the last ~5 minutes of device time on nvidia-h200: bench/overhead.py at this session's code (the
# controller polling 1 ms, the node's default on a GPU machine), as session 18 measured it (0.777 ms p50).
set -u
export PYTHONUNBUFFERED=1
python -m pip install --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep "Model name"; } > $OUT/machine.txt 2>&1
cp .whl/s21c.sh $OUT/
timeout 240 python bench/overhead.py --out $OUT/overhead --requests 2000 --warmup 200 --seconds 3 --spin-ms 1 > $OUT/overhead.log 2>&1
echo "rc=$?"; python -c "
import json; d=json.load(open('$OUT/overhead/overhead.json'))
print({k: d[k] for k in ('p50_overhead_ms','p99_overhead_ms','max_rps','spin_ms')}, d.get('cpu_canary'), d.get('p50_parts_ms'))"
