#!/bin/bash
# Session 23, third lease (one H200, ~3 min): the GPU tests that failed in s24b, at this tree (N) and at 9f69ab9 (B).
export PYTHONUNBUFFERED=1
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
T="tests/integration/test_node_stress.py tests/integration/test_device_lost.py"
mkdir -p /tmp/b && cp -r .whl/base2/swapserve /tmp/b/ && cp -r tests /tmp/b/ && cp pyproject.toml /tmp/b/
echo "=== B $(date +%T)"; (cd /tmp/b && PYTHONPATH=/tmp/b timeout 90 python -m pytest -q -p no:cacheprovider -m gpu $T 2>&1 | grep -E "passed|failed|^E  " | head -8)
echo "=== N $(date +%T)"; PYTHONPATH=$PWD timeout 90 python -m pytest -q -p no:cacheprovider -m gpu $T -x 2>&1 | grep -E "passed|failed|^E  " | head -8
echo "=== done $(date +%T)"
