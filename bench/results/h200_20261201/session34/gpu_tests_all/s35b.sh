#!/bin/bash
# Session 34, second call (~5 min): every GPU-marked test, the engine's CUDA cases now among them (bit-identical
# swapped and resident runs, eager and graph, on cuda:0).
set -u
source bench/lease.sh .whl/s35b.sh; R=$LEASE_RESULTS
echo "=== step gpu tests $(date +%T)"
timeout 420 python -m pytest -q -p no:cacheprovider -m gpu tests --durations 15 > $R/gpu_tests.txt 2>&1
echo "pytest rc=$?"; tail -4 $R/gpu_tests.txt
echo "=== all done $(date +%T)"
