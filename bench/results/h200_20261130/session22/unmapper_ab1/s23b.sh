#!/bin/bash
# Session 22 (2026-11-30), one H200: the unmapper (stale slots unmapped off the request path) on the GPU.
# (1) the engine's and the pool's tests with their CUDA modes; (2) bench/remap_cost.py, now splitting off the
# unmaps; (3) bench/code_ab.sh at N=400, one pair: this tree (new) against 474e1c8 (base, .whl/base).
set -u
export PYTHONUNBUFFERED=1
R=/tmp/res4; mkdir -p $R
exec > $R/session.log 2>&1
cp .whl/s23b.sh $R/
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > $R/machine.txt
lscpu | grep -E 'Model name|^CPU\(s\)|MHz' >> $R/machine.txt
echo "=== step engine tests $(date -u +%T)"
timeout 400 python -m pytest -q -p no:cacheprovider tests/unit/test_engine.py tests/unit/test_pages.py > $R/engine_tests.log 2>&1; echo "tests rc=$?"
tail -3 $R/engine_tests.log
echo "=== step remap_cost $(date -u +%T)"
timeout 200 python bench/remap_cost.py --out $R/remap_cost > $R/remap_cost.log 2>&1; echo "remap_cost rc=$?"
tail -12 $R/remap_cost/remap_cost.md
echo "=== step code_ab N=400 $(date -u +%T)"
timeout 700 bash bench/code_ab.sh .whl/base $R/ab 400 1 > $R/code_ab.log 2>&1; echo "code_ab rc=$?"
grep -E "RESULT|attain|median|sign|===|ready" $R/code_ab.log | tail -30
for f in $R/ab/*/serve_*.log; do [ -f $f ] && grep -HcE "collection" $f; grep -HE "did not stop|Traceback|unmapping" $f | head -5; done
echo "=== all done $(date -u +%T)"
