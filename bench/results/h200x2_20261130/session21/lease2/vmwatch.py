"""Samples the machine's memory-management counters and pressure stall totals every 0.1 s (only the counters
that moved), with the wall time, and the moment the trace's node said ready; until killed."""
import sys, time, json
out = open(sys.argv[1], "w"); logf = sys.argv[2]
KEYS = ("compact_stall", "compact_fail", "compact_success", "allocstall_normal", "allocstall_movable", "pgscan_kswapd",
        "pgscan_direct", "pgsteal_kswapd", "pgsteal_direct", "thp_fault_alloc", "thp_collapse_alloc", "pgmajfault",
        "numa_pte_updates", "numa_hint_faults", "pgmigrate_success", "thp_split_pmd", "nr_free_pages", "compact_daemon_wake",
        "kswapd_low_wmark_hit_quickly", "drop_pagecache", "workingset_refault_file")
def read():
    d = {}
    for line in open("/proc/vmstat"):
        k, v = line.split()
        if k in KEYS: d[k] = int(v)
    for r in ("memory", "cpu", "io"):
        try:
            for line in open(f"/proc/pressure/{r}"):
                kind, *f = line.split()
                d[f"psi_{r}_{kind}_us"] = int(f[-1].split("=")[1])
        except OSError:
            pass
    return d
prev = read(); ready = None
out.write(json.dumps({"t": time.time(), "all": prev}) + "\n")
while True:
    time.sleep(0.1)
    cur = read(); t = time.time()
    moved = {k: v - prev.get(k, 0) for k, v in cur.items() if v != prev.get(k)}
    if moved:
        out.write(json.dumps({"t": round(t, 3), **moved}) + "\n"); out.flush()
    prev = cur
    if ready is None:
        try:
            if "node ready" in open(logf).read():
                ready = t; out.write(json.dumps({"t": round(t, 3), "ready": True}) + "\n"); out.flush()
        except OSError:
            pass
