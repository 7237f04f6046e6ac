#!/bin/bash
# Session 25, second lease (one H200, ~4 min): the two GPU tests that failed in s26a (device lost: the worker
# not ended 5 s after its pipe closed; node stress polling: a queue of 64), at this tree (N) and at 04b8a0f (B,
# main before session 24's changes), N first.
export PYTHONUNBUFFERED=1
python -m pip install -q --no-index --no-deps --find-links .whl/orjson orjson 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log --oneline -1
T="tests/integration/test_node_stress.py tests/integration/test_device_lost.py"
rm -rf /tmp/n /tmp/b; mkdir -p /tmp/n /tmp/b; cp -r swapserve tests pyproject.toml /tmp/n/; cp -r .whl/base/* /tmp/b/
for side in n b n; do
  echo "=== $side $(date +%T)"
  (cd /tmp/$side && PYTHONPATH=/tmp/$side timeout 110 python -m pytest -q -p no:cacheprovider -m gpu -rA $T 2>&1 \
     | grep -E "passed|failed|^E  |^(PASSED|FAILED)|duration|exit" | head -14)
done
echo "=== done $(date +%T)"
