#!/bin/bash
# Session 21 (2026-11-30), third lease of nvidia-h200-x2 (~2 min): bench/remap_stalls.py, 40 s, nothing else
# of swapserve running: do the driver's page remaps stall on their own, on both GPUs at once, every 10 s?
set -u
R=/tmp/res4; rm -rf $R; mkdir -p $R
exec > >(tee -a $R/session.log) 2>&1
cp .whl/s22d.sh $R/
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; ps aux --sort=-%cpu | head -25; } > $R/machine.txt 2>&1
PYTHONPATH=$PWD timeout 150 python bench/remap_stalls.py --out $R/remap_stalls --seconds 40 2>&1 | tail -8
echo "RESULT rc=$?"
echo "=== all done $(date +%T)"
