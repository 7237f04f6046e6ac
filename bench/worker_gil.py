"""What a swap's remaps cost when another thread of the worker runs Python meanwhile, by switch interval.

The node's trace (one H200, N=400) put ~0.7 ms in the remaps of a swapped run (``phases_ms.place_remap``)
where ``bench/remap_cost.py`` measured 0.07-0.19 ms for the same pages alone, beside kernels, beside queued
copies or output copies, or with every page mapped in 64 other ranges. A worker runs its lanes in threads:
each driver call releases the GIL and must take it back, and while the other lane runs Python (a run's
launch, its outputs) it waits until that thread blocks or the interpreter's switch interval (5 ms by default)
forces a hand-over. This remaps 2 pages of 32 MiB back and forth alone and beside a thread that runs Python
in 0.8 ms bursts with 0.2 ms pauses, for switch intervals of 5, 0.5 and 0.1 ms.

    python bench/worker_gil.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 40]

Writes worker_gil.json, worker_gil.md and worker_gil.png (``--render`` redraws them from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = 32 << 20
PAGES = 2
INTERVALS_S = (0.005, 0.0005, 0.0001)


def measure(rounds: int) -> dict:
    import torch

    from swapserve.engine.backend.cuda import CudaBackend

    be = CudaBackend("cuda:0", PAGE)
    be.create_pages(2 * PAGES)
    va = be.reserve(PAGES * PAGE)
    for i in range(PAGES):
        be.map(va + i * PAGE, i)
    stop = threading.Event()

    def python_bursts() -> None:
        x = 0
        while not stop.is_set():
            t = time.perf_counter()
            while time.perf_counter() - t < 0.0008:
                x += 1
            time.sleep(0.0002)

    def remap(to_set: int) -> float:
        t = time.perf_counter()
        for i in range(PAGES):
            be.unmap(va + i * PAGE)
            be.map(va + i * PAGE, to_set * PAGES + i)
        return (time.perf_counter() - t) * 1e3

    rows = []
    default = sys.getswitchinterval()
    try:
        for interval in INTERVALS_S:
            sys.setswitchinterval(interval)
            for beside in (False, True):
                stop.clear()
                other = threading.Thread(target=python_bursts, daemon=True)
                if beside:
                    other.start()
                times = []
                for _ in range(rounds):
                    times += [remap(1), remap(0)]
                    time.sleep(0.001)
                stop.set()
                if beside:
                    other.join()
                rows.append({"switch_interval_ms": interval * 1e3, "python_beside": beside,
                             "p50_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * len(times))]})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        sys.setswitchinterval(default)
    for i in range(PAGES):
        be.unmap(va + i * PAGE)
    be.release(va, PAGES * PAGE)
    return {"gpu": torch.cuda.get_device_name(be.device), "date": date.today().isoformat(), "pages": PAGES,
            "page_bytes": PAGE, "rounds": rounds, "results": rows}


def report(result: dict, out: Path) -> None:
    from bars import bars

    lines = [f"# A swap's remaps beside another thread's Python — {result['gpu']}, {result['date']}", "",
             f"{result['pages']} pages of {result['page_bytes'] >> 20} MiB remapped (unmap, map, grant access), "
             f"{2 * result['rounds']} times; p50 (p90) ms.", "",
             "| switch interval | alone | beside 0.8 ms bursts of Python |", "|---:|---:|---:|"]
    for ms in sorted({r["switch_interval_ms"] for r in result["results"]}, reverse=True):
        cells = {r["python_beside"]: r for r in result["results"] if r["switch_interval_ms"] == ms}
        lines.append(f"| {ms:g} ms | " + " | ".join(f"{cells[b]['p50_ms']:.3f} ({cells[b]['p90_ms']:.3f})"
                                                      for b in (False, True)) + " |")
    (out / "worker_gil.md").write_text("\n".join(lines) + "\n")
    bars(out / "worker_gil.png", f"Remap of {result['pages']} pages (p50) — {result['gpu']}",
         [(f"switch {r['switch_interval_ms']:g} ms, {'beside Python' if r['python_beside'] else 'alone'}", r["p50_ms"])
          for r in result["results"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--render", action="store_true", help="redraw the table and plot from worker_gil.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        report(json.loads((args.out / "worker_gil.json").read_text()), args.out)
        return
    result = measure(args.rounds)
    (args.out / "worker_gil.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    print((args.out / "worker_gil.md").read_text())


if __name__ == "__main__":
    main()
