"""When do the driver's page remaps stall, with nothing of swapserve running?

In two-H200 replays at N = 800 a handful of swapped runs spent 10–62 ms remapping their pages (usually 0.01 ms at
the median, 1.5 ms at p99), with a third to a half of it the worker thread's CPU time, and most of the stalls came
on both GPUs within 0.1 s of each other, 10 s apart (bench/results/h200x2_20261130/README.md). This probes the
machine alone: one process per GPU unmaps and maps one page of a 32 MiB range onto another physical page and
back (the engine's own ``CudaBackend.unmap`` and ``map``) every ``--every-ms`` for ``--seconds``, timing each
remap's wall and CPU time; a process of its own sleeps 1 ms at a time and times how late it wakes (a stall of
the whole machine). ``--extra-mappings K`` maps the probe's two pages into K more ranges first, as a node's pages
are mapped in many models' ranges. Every remap over ``--stall-ms`` and every wake-up later than that is recorded with its
wall-clock time, and the processes that hold the GPUs' device files at the start are listed (a monitor that
polls the driver would show there, if it runs inside this machine).

    python bench/remap_stalls.py --out bench/results/<gpu>_<yyyymmdd>/remap_stalls [--seconds 40]

Writes remap_stalls.json: per GPU, the count and percentiles of the remaps and each stall (t, ms, cpu_ms); the
CPU probe's late wake-ups; stalls on two GPUs within 0.1 s of each other; the intervals between stalls. Then
remap_stalls.md (a table) and remap_stalls.png (every stall against its time); ``--render`` redraws those two
from the JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE = 32 << 20
TOGETHER_S = 0.1
"""Stalls on different GPUs this close in time count as one event."""


def gpu_probe(index: int, seconds: float, every_ms: float, stall_ms: float, start_at: float, extra: int,
              q: mp.Queue) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    from swapserve.engine.backend.cuda import CudaBackend

    be = CudaBackend("cuda:0", PAGE)
    be.create_pages(2)
    va = be.reserve(PAGE)
    be.map(va, 0)
    # A node keeps a model's mappings after eviction, and prepares every model on every device at its start:
    # each physical page is mapped in many ranges (N = 800 on two H200s: ~186 GB of models in 32 MiB slots,
    # ~5,800 mappings a device). ``extra`` more ranges, each mapping one of the two pages, stand for them.
    for i in range(extra):
        be.map(be.reserve(PAGE), i % 2)
    times: list[float] = []
    stalls: list[dict] = []
    page = 0
    while time.time() < start_at:
        time.sleep(0.01)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        page ^= 1
        t, c = time.perf_counter(), time.thread_time()
        be.unmap(va)
        be.map(va, page)
        ms, cpu_ms = (time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3
        times.append(ms)
        if ms > stall_ms:
            stalls.append({"t": time.time() - ms / 1e3, "ms": ms, "cpu_ms": cpu_ms})
        time.sleep(every_ms / 1e3)
    be.unmap(va)
    be.release(va, PAGE)
    times.sort()
    q.put((index, {"remaps": len(times), "p50_ms": times[len(times) // 2], "p99_ms": times[int(0.99 * len(times))],
                   "max_ms": times[-1], "stalls": stalls}))


def cpu_probe(seconds: float, stall_ms: float, start_at: float, q: mp.Queue) -> None:
    late: list[dict] = []
    wakes = 0
    while time.time() < start_at:
        time.sleep(0.01)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        time.sleep(0.001)
        over = (time.perf_counter() - t) * 1e3 - 1.0
        wakes += 1
        if over > stall_ms:
            late.append({"t": time.time() - over / 1e3, "late_ms": over})
    q.put(("cpu", {"wakes": wakes, "late": late}))


def gpu_holders() -> list[dict]:
    """Processes with a GPU device file open (in this machine), with their command lines."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia") for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append({"pid": int(pid), "cmdline": cmd.strip()[:200]})
        except OSError:
            continue
    return out


def together(per_gpu: dict[int, dict]) -> list[list[dict]]:
    """Stalls on two or more GPUs within :data:`TOGETHER_S` of each other."""
    events = sorted(({"gpu": g, **s} for g, r in per_gpu.items() for s in r["stalls"]), key=lambda s: s["t"])
    groups: list[list[dict]] = []
    for s in events:
        if groups and s["t"] - groups[-1][-1]["t"] <= TOGETHER_S:
            groups[-1].append(s)
        else:
            groups.append([s])
    return [g for g in groups if len({s["gpu"] for s in g}) > 1]


def report(result: dict, out: Path) -> None:
    """remap_stalls.md and remap_stalls.png from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, limit = result["started_at"], result["stall_ms"]
    lines = [f"# Remap stalls with nothing else running — {result['gpu']} × {result['gpus']}, {result['date']}", "",
             f"One process per GPU remapped one {PAGE >> 20} MiB page every {result['every_ms']:g} ms for "
             f"{result['seconds']:g} s, its pages mapped in {result.get('extra_mappings', 0)} more ranges; stalls: "
             f"remaps over {limit:g} ms (s from the start, ms, the thread's CPU ms). Stalls on two GPUs within "
             f"{TOGETHER_S:g} s: {len(result['together'])}. CPU probe: {len(result['cpu']['late'])} of "
             f"{result['cpu']['wakes']} 1 ms sleeps woke over {limit:g} ms late.", "",
             "| GPU | remaps | p50 ms | p99 ms | max ms | stalls |", "|---:|---:|---:|---:|---:|---|"]
    for g, r in sorted(result["per_gpu"].items(), key=lambda kv: int(kv[0])):
        stalls = ", ".join(f"{s['t'] - t0:.2f} s: {s['ms']:.1f} ({s['cpu_ms']:.1f})" for s in r["stalls"])
        lines.append(f"| {g} | {r['remaps']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_ms']:.1f} | "
                     f"{stalls or '-'} |")
    (out / "remap_stalls.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for g, r in sorted(result["per_gpu"].items(), key=lambda kv: int(kv[0])):
        ax.scatter([s["t"] - t0 for s in r["stalls"]], [s["ms"] for s in r["stalls"]], label=f"GPU {g} remap",
                   marker="o^sv"[int(g) % 4], alpha=0.7)
    late = result["cpu"]["late"]
    ax.scatter([s["t"] - t0 for s in late], [s["late_ms"] for s in late], label="CPU wake-up late", marker="x",
               color="black")
    ax.axhline(limit, color="tab:gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, result["seconds"])
    ax.set_xlabel("s from the start")
    ax.set_ylabel("ms")
    ax.set_title(f"Remaps over {limit:g} ms — {result['gpu']} × {result['gpus']}, "
                 f"{result.get('extra_mappings', 0)} extra mappings", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "remap_stalls.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--every-ms", type=float, default=1.0)
    ap.add_argument("--stall-ms", type=float, default=2.0)
    ap.add_argument("--extra-mappings", type=int, default=0, help="ranges more mapping the probe's pages, per GPU")
    ap.add_argument("--render", action="store_true", help="only redraw the table and plot from OUT/remap_stalls.json")
    args = ap.parse_args()
    if args.render:
        report(json.loads((args.out / "remap_stalls.json").read_text()), args.out)
        return
    import torch

    n = torch.cuda.device_count()
    if not n:
        raise SystemExit("no GPU: this probes the CUDA driver's remaps")
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    holders = gpu_holders()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 15.0 + args.extra_mappings * 0.001  # every process has its context (and mappings) by then
    procs = [ctx.Process(target=gpu_probe, args=(i, args.seconds, args.every_ms, args.stall_ms, start_at,
                                                 args.extra_mappings, q)) for i in range(n)]
    procs.append(ctx.Process(target=cpu_probe, args=(args.seconds, args.stall_ms, start_at, q)))
    for p in procs:
        p.start()
    got = dict(q.get(timeout=args.seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    per_gpu = {i: got[i] for i in range(n)}
    stall_times = sorted(s["t"] for r in per_gpu.values() for s in r["stalls"])
    result = {"gpu": names[0], "gpus": n, "date": date.today().isoformat(), "seconds": args.seconds,
              "every_ms": args.every_ms, "stall_ms": args.stall_ms, "extra_mappings": args.extra_mappings,
              "started_at": start_at,
              "gpu_holders_at_start": holders, "per_gpu": per_gpu, "cpu": got["cpu"],
              "together": together(per_gpu),
              "intervals_s": [round(b - a, 3) for a, b in zip(stall_times, stall_times[1:])]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remap_stalls.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    for i, r in per_gpu.items():
        print(f"GPU {i}: {r['remaps']} remaps, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
              f"max {r['max_ms']:.1f} ms, {len(r['stalls'])} over {args.stall_ms:g} ms: "
              + ", ".join(f"{s['t'] - start_at:.2f} s {s['ms']:.1f} ms (cpu {s['cpu_ms']:.1f})" for s in r["stalls"][:20]))
    print(f"CPU probe: {got['cpu']['wakes']} wake-ups, {len(got['cpu']['late'])} late over {args.stall_ms:g} ms: "
          + ", ".join(f"{s['t'] - start_at:.2f} s {s['late_ms']:.1f} ms" for s in got["cpu"]["late"][:20]))
    print(f"together: {len(result['together'])}; holders at start: {holders}")


if __name__ == "__main__":
    main()
