"""A request's input upload while another lane's swap copies are queued: copy engine vs kernel.

The node's trace showed resident runs in the side lane taking as long as the swap running beside them in
lane 0 (an efficientnet_b0 run 17 ms beside a GPT-2 swap of 18 ms, against 1.7 ms alone). The copy engines
work through their queue in order: a swap queues hundreds of chunk copies at once, and an input copied with
``cudaMemcpyAsync`` (``tensor.to("cuda")``) waits behind them. A kernel reading the (registered, mapped)
host memory over the bus does not queue there (``CudaBackend.upload``, what the engine uses now).

Each round starts a swap-sized copy (``--swap-mib`` of pinned host memory in the engine's chunks, through
``CudaBackend.start_copies``, the swap's own path) on the copy stream, waits ``--delay-ms``, then times an
input's upload on another stream, both ways, for several input sizes; also each upload with nothing queued.
Model-sized inputs (``--sizes-kib``) ask whether a model's bytes could go up by kernel beside a swap: the
rows then also give the swap's own time with the upload beside it.
Inputs lie in a registered buffer, as a worker's IO slab does; every upload is checked bit for bit.

    python bench/copy_queue.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 20]

Writes copy_queue.json, copy_queue.md and copy_queue.png (``--render`` redraws the plot from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES_KIB = (4, 64, 294, 1176)
"""Input sizes: a token row, a small tensor, one fp16 224×224 image, four of them (a batch)."""


def measure(rounds: int, swap_mib: int, delay_ms: float, chunk_mib: int,
            sizes_kib: tuple[int, ...] = SIZES_KIB) -> tuple[list[dict], float]:
    import torch

    from swapserve.engine.backend.base import Backend
    from swapserve.engine.backend.cuda import CudaBackend
    from swapserve.engine.layout import Chunk

    be = CudaBackend("cuda:0", 2 << 20)
    dev = be.device
    nbytes = swap_mib << 20
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    host.fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    step = chunk_mib << 20
    chunks = [Chunk(s, min(s + step, nbytes)) for s in range(0, nbytes, step)]
    events = be.new_events(len(chunks))
    copy = [True] * len(chunks)
    slab = torch.zeros((max(sizes_kib) << 10) + 4096, dtype=torch.uint8)  # an IO slab's stand-in, registered as the worker's
    be.pin(slab)
    side = torch.cuda.Stream(dev)

    def swap_alone() -> float:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        be.start_copies(dst.data_ptr(), host, chunks, copy, events).finish()
        return (time.perf_counter() - t) * 1e3

    swap_ms = statistics.median(swap_alone() for _ in range(3))
    rows = []
    try:
        for kib in sizes_kib:
            x = slab[256:256 + (kib << 10)]
            x.random_(0, 256)
            ways = (("copy engine (tensor.to)", lambda t: Backend.upload(be, t)), ("kernel (upload)", be.upload))
            for way, upload in ways:
                for busy in (False, True):
                    times, swaps = [], []
                    for _ in range(rounds):
                        torch.cuda.synchronize(dev)
                        t_swap = time.perf_counter()
                        waiter = be.start_copies(dst.data_ptr(), host, chunks, copy, events) if busy else None
                        if busy:
                            time.sleep(delay_ms / 1e3)
                        t = time.perf_counter()
                        with torch.cuda.stream(side):
                            y = upload(x)
                        side.synchronize()
                        times.append((time.perf_counter() - t) * 1e3)
                        if waiter is not None:
                            waiter.finish()
                            swaps.append((time.perf_counter() - t_swap) * 1e3)
                        if not torch.equal(y.cpu(), x):
                            raise AssertionError(f"{way} changed the bytes of a {kib} KiB input")
                    rows.append({"input_kib": kib, "way": way, "during_swap": busy,
                                 "p50_ms": statistics.median(times), "max_ms": max(times),
                                 "swap_p50_ms": statistics.median(swaps) if swaps else None})
                    print(f"{kib:5d} KiB  {way:24s} {'during swap' if busy else 'alone':12s} "
                          f"p50 {rows[-1]['p50_ms']:.3f} ms", flush=True)
    finally:
        be.unpin(slab)
    return rows, swap_ms


def plot(result: dict, out: Path) -> None:
    from bars import bars

    rows = [(f"{r['input_kib']} KiB, {r['way']}", r["p50_ms"]) for r in result["rows"] if r["during_swap"]]
    bars(out / "copy_queue.png", f"Input upload during a {result['swap_mib']} MiB swap (p50) — {result['gpu']}, "
         f"{result['date']}", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--swap-mib", type=int, default=640, help="bytes the swap copies (bert-large in fp16: 640)")
    ap.add_argument("--chunk-mib", type=int, default=2, help="the swap's copy chunk (the engine's page)")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="after the swap's copies are queued")
    ap.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)),
                    help="input sizes (KiB); model-sized ones show what a copy by kernel beside a swap achieves")
    ap.add_argument("--render", action="store_true", help="only redraw the plot from OUT/copy_queue.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        plot(json.loads((args.out / "copy_queue.json").read_text()), args.out)
        return
    import torch

    sizes = tuple(int(k) for k in args.sizes_kib.split(","))
    rows, swap_ms = measure(args.rounds, args.swap_mib, args.delay_ms, args.chunk_mib, sizes)
    result = {"gpu": torch.cuda.get_device_name(0), "date": date.today().isoformat(), "swap_mib": args.swap_mib,
              "chunk_mib": args.chunk_mib, "delay_ms": args.delay_ms, "rounds": args.rounds,
              "swap_alone_ms": swap_ms, "rows": rows}
    (args.out / "copy_queue.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out)
    lines = [f"# Input upload during a swap — {result['gpu']}, {result['date']}", "",
             f"A {args.swap_mib} MiB swap's copies ({args.chunk_mib} MiB chunks, {swap_ms:.1f} ms alone) queued on the "
             f"copy stream; {args.delay_ms:g} ms later an input in registered host memory is uploaded on another "
             f"stream, {args.rounds} rounds; every upload checked bit for bit.", "",
             "| input | way | alone p50 ms | during swap p50 ms | during swap max ms | the swap beside it p50 ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["during_swap"]:
            alone = next(a for a in rows if a["input_kib"] == r["input_kib"] and a["way"] == r["way"]
                         and not a["during_swap"])
            lines.append(f"| {r['input_kib']} KiB | {r['way']} | {alone['p50_ms']:.3f} | {r['p50_ms']:.3f} | "
                         f"{r['max_ms']:.3f} | {r['swap_p50_ms']:.2f} |")
    (args.out / "copy_queue.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
