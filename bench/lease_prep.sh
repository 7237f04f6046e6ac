#!/usr/bin/env bash
# What a lease needs beside the working tree, made here (this machine has a package registry; the lent GPU
# machines have none, and run Python 3.12): wheels of orjson and py-spy in .whl/orjson and .whl/py-spy, which
# bench/lease.sh installs there; and, given a revision, its swapserve/ and bench/ in .whl/base for
# bench/code_ab.sh. .whl/ is kept out of git (.git/info/exclude). A fresh checkout has none of it.
#
#   bench/lease_prep.sh [BASE_REV]          (LEASE_PYTHON: the lent machines' Python, default 3.12)
#
# Then carry .whl/orjson, .whl/py-spy, the run script (and .whl/base) in the device tool's call: with the tracked
# tree they must stay under its 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${LEASE_PYTHON:-3.12}
python3 -m pip download -q orjson --python-version "$py" --only-binary=:all: --platform manylinux_2_17_x86_64 \
  --no-deps -d .whl/orjson
python3 -m pip download -q py-spy --python-version "$py" --only-binary=:all: --platform manylinux1_x86_64 \
  --no-deps -d .whl/py-spy
if [ -n "${1:-}" ]; then
  rm -rf .whl/base && mkdir -p .whl/base
  git archive "$1" swapserve bench | tar -x -C .whl/base
  rm -rf .whl/base/bench/results
fi
du -sh .whl/*
echo "the tracked tree: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
