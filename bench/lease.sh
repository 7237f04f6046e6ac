# What every run script on a lent GPU machine does first (sourced, from the working tree's root):
#
#   source bench/lease.sh SCRIPT [RESULTS] [COPY]
#
# - RESULTS (default /tmp/res4) emptied; everything the script prints from here on also goes to
#   RESULTS/session.log, and SCRIPT is copied there (what ran beside what it gave). Keep it outside $OUT and
#   tar it into $OUT when collecting (bench/lease_poll.sh): the device tool leaves out folders nested deep under
#   $OUT (a trace's DIR/trace_raw at $OUT/res4/two/trace_raw did not come back in session 28);
# - the tree (swapserve, bench, tests, examples, pyproject.toml) copied to COPY (default /tmp/tree) and the
#   script continues there with PYTHONPATH on it: the device tool's next call replaces the working tree, and a
#   replay once lost its working directory under it;
# - /dev/shm enlarged (the host store lives there) where the machine lets it be;
# - orjson and py-spy installed from .whl/orjson and .whl/py-spy when carried (the lent machines have no package
#   registry; py-spy for bench/trace.py --profile);
# - RESULTS/machine.txt: the GPUs, their links, CPUs, memory and the commit;
# - trace_results DIR: one RESULT line per point of DIR/trace.json (what a poll of session.log shows);
# - overhead_results DIR: DIR/overhead.json's p50, p99, requests/s, CPU canary and the p50 request's parts.
LEASE_RESULTS=${2:-/tmp/res4}
LEASE_COPY=${3:-/tmp/tree}
rm -rf "$LEASE_RESULTS" "$LEASE_COPY"
mkdir -p "$LEASE_RESULTS" "$LEASE_COPY"
exec > >(tee -a "$LEASE_RESULTS/session.log") 2>&1
cp "${1:?the run script}" "$LEASE_RESULTS/"
cp -r swapserve bench tests examples pyproject.toml "$LEASE_COPY/"
mount -o remount,size=225G /dev/shm 2>/dev/null || true
export PYTHONUNBUFFERED=1
for pkg in orjson py-spy; do  # each from its folder of wheels where carried (.whl/orjson, .whl/py-spy)
  if [ -d ".whl/$pkg" ]; then
    python -m pip install --no-index --no-deps --find-links ".whl/$pkg" "$pkg" 2>&1 | tail -1
  fi
done
PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # where py-spy went
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max \
    --format=csv
  nvidia-smi topo -m; nproc; free -g; lscpu | grep "Model name"; git log --oneline -1
  cat /sys/kernel/mm/transparent_hugepage/shmem_enabled; grep /dev/shm /proc/mounts
} > "$LEASE_RESULTS/machine.txt" 2>&1
cat "$LEASE_RESULTS/machine.txt"
cd "$LEASE_COPY" || exit 1
export PYTHONPATH=$LEASE_COPY
trace_results() {
  python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/trace.json"))
for pol, v in d["policies"].items():
    for p in v["sweep"]:
        print("RESULT", sys.argv[1].rstrip("/").split("/")[-1], pol, "N", p["n"], "attainment", p["attainment"],
              "in_slo", p.get("requests_in_slo"), "p50", p["p50_ms"], "p99", p["p99_ms"],
              "swaps by device", {k: v.get("swapped") for k, v in (p.get("by_device") or {}).items()})
PY
}

overhead_results() {
  python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/overhead.json"))
print("RESULT ov", sys.argv[1].rstrip("/").split("/")[-1], "p50", round(d["p50_overhead_ms"], 3),
      "p99", round(d["p99_overhead_ms"], 3), "rps", round(d["max_rps"]),
      "canary", round(d.get("cpu_canary", {}).get("median_ms", 0), 3))
print("  parts", {k: round(x, 3) for k, x in d.get("p50_parts_ms", {}).items()})
PY
}
