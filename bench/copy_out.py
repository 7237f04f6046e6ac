"""What copying a run's large outputs out of the IO slab costs the controller, by where they go.

In the one-H200 trace at N = 400 (the sixteenth session's sweep, bench/results/h200_20261129/) a batch of four GPT-2 answers (4 ×
12.9 MB of logits) spent 10.5 ms in the controller after its run, most of it copying the outputs out of the
worker's IO slab into fresh tensors (``Dispatcher._complete``: ``COPY_THREADS`` threads, pieces of
``COPY_PIECE_BYTES``). A copy into fresh memory also faults in every page it writes (glibc maps each
allocation this large anew and unmaps it when freed). This times that copy, exactly as the dispatcher
makes it (``_answers``' ``empty_like`` destinations, ``_pieces`` over the same thread count), from a shared
memory file like the slab, with each round's destinations freed before the next as the answers are:

  * ``fresh``: the process's default allocator (what the controller did);
  * ``heap``: the same after ``swapserve.hostmem.keep_freed_memory`` (what ``serve`` does since): allocations
    this large stay on the heap, and so does freed memory (no mapping per allocation: its pages stay faulted
    in for the next);
  * ``reused``: destinations allocated once (the floor: the copy alone).

Each mode runs in a process of its own (``mallopt`` is process-wide).

    python bench/copy_out.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 60]

Writes copy_out.json, copy_out.md and copy_out.png.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPT2_LOGITS = (1, 128, 50257)
"""One GPT-2-medium answer of the zoo (fp16): 12.9 MB."""
BATCHES = (1, 4)
MODES = ("fresh", "heap", "reused")


def measure(mode: str, rounds: int, q: mp.Queue) -> None:
    import torch

    from swapserve.hostmem import keep_freed_memory
    from swapserve.node.dispatch import COPY_THREADS, _pieces, copy_all

    torch.set_num_threads(1)  # as the controller runs
    if mode == "heap" and not keep_freed_memory():
        raise SystemExit("this process's allocator cannot be told to keep freed memory (not glibc)")
    out = {}
    one = torch.Size(GPT2_LOGITS).numel() * 2
    with tempfile.TemporaryFile(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as f:
        f.truncate(one * max(BATCHES))
        slab = torch.frombuffer(mmap.mmap(f.fileno(), one * max(BATCHES)), dtype=torch.float16)
        slab.normal_()
        pool = ThreadPoolExecutor(COPY_THREADS)
        for batch in BATCHES:
            srcs = [slab[i * (one // 2):(i + 1) * (one // 2)].view(GPT2_LOGITS) for i in range(batch)]
            kept = [torch.empty_like(s) for s in srcs]
            times = []
            for r in range(rounds + 5):
                t0 = time.perf_counter()
                dests = kept if mode == "reused" else [torch.empty_like(s) for s in srcs]
                list(pool.map(copy_all, _pieces(list(zip(dests, srcs)), COPY_THREADS)))
                ms = (time.perf_counter() - t0) * 1e3
                if not all(torch.equal(d, s) for d, s in zip(dests, srcs)):
                    raise SystemExit(f"{mode}: a copy differs from its source")
                del dests  # freed, as an answer is once written
                if r >= 5:
                    times.append(ms)
            times.sort()
            out[str(batch)] = {"p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))],
                               "GBps": batch * one / statistics.median(times) / 1e6}
        pool.shutdown()
    q.put(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    results = {}
    for mode in MODES:
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(mode, args.rounds, q))
        p.start()
        results[mode] = q.get()
        p.join()
        print(mode, json.dumps(results[mode]), flush=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    doc = {"device": device, "date": date.today().isoformat(), "rounds": args.rounds, "output": list(GPT2_LOGITS),
           "dtype": "float16", "modes": results}
    (args.out / "copy_out.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Copying large outputs out of the IO slab — {device}, {doc['date']}", "",
             f"GPT-2-medium answers ({' × '.join(map(str, GPT2_LOGITS))} fp16, 12.9 MB each), copied as the "
             f"dispatcher copies them; median (p90) of {args.rounds} rounds (bench/copy_out.py).", "",
             "| mode | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|" + "---:|" * len(BATCHES)]
    for mode, r in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{r[str(b)]['p50_ms']:.2f} ms ({r[str(b)]['p90_ms']:.2f}), "
                                                  f"{r[str(b)]['GBps']:.1f} GB/s" for b in BATCHES) + " |")
    (args.out / "copy_out.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(MODES)
    for k, mode in enumerate(MODES):
        ax.bar([i + k * width for i in range(len(BATCHES))], [results[mode][str(b)]["p50_ms"] for b in BATCHES],
               width, label=mode)
    ax.set_xticks([i + width for i in range(len(BATCHES))], [f"batch {b}" for b in BATCHES])
    ax.set_ylabel("copy-out, median ms")
    ax.set_title(f"GPT-2 answers out of the IO slab — {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "copy_out.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
