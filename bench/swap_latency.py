"""Swap latency: swapserve's cold swap-in + run against native PyTorch, per model and dtype.

Run on a GPU (the lent H100/H200). For each model of the zoo at batch 1, in fp32 and fp16, all in
this one process on one card, it measures (median of --runs after --warmup):

  native_ms        resident, eager PyTorch (the nn.Module on the GPU)
  native_graph_ms  resident, the module's forward replayed as a CUDA graph
  ondemand_ms      module.to("cuda") from pageable host memory, then run (what users get without us)
  bulk_ms          one pinned host→device copy of every weight, then run eagerly
  swapserve_ms     swapserve from a cold device (model not resident), through its real engine
  floor_ms         model bytes / pinned host→device bandwidth measured in this run

plus swapserve's resident run, its eager-mode swap, the first swap of a never-seen model (artifact
load, host store fill, placement, capture) and the CPU time per swap; and it checks that swapped
outputs are bit-identical to resident ones in each mode.

    python bench/swap_latency.py --out DIR [--models resnet50,bert-base] [--dtypes float32,float16]

Writes DIR/swap_latency.json after every model (a timeout keeps what was measured), then a table
and a plot (see bench/report_swap_latency.py, which can also merge several partial JSON files).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapserve.artifact import build_artifact, load_artifact, zoo  # noqa: E402
from swapserve.config import EngineConfig, GiB, MiB, env  # noqa: E402
from swapserve.engine import HostStore, SwapEngine  # noqa: E402


def timed(fn: Callable[[], object], runs: int, warmup: int, before: Callable[[], object] | None = None,
          after: Callable[[], object] | None = None) -> tuple[float, list[float]]:
    """Median wall time (ms) of ``fn``, synchronized, and every timed run's wall time."""
    walls = []
    for i in range(warmup + runs):
        if before:
            before()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        if after:
            after()
        if i >= warmup:
            walls.append((t1 - t0) * 1e3)
    return statistics.median(walls), walls


def bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit for bit (NaN payloads included), not by value."""
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and
                                    torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
                                    for x, y in zip(a, b))


def h2d_bandwidth(nbytes: int = 1 << 30, runs: int = 10) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms, _ = timed(lambda: dev.copy_(host, non_blocking=True), runs, 2)
    return nbytes / (ms / 1e3) / 1e9


def graph_of(module: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> Callable[[], list[torch.Tensor]]:
    static = [t.clone() for t in x]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            module(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        out = module(*static)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)

    def run() -> list[torch.Tensor]:
        for d, t in zip(static, x):
            d.copy_(t, non_blocking=True)
        g.replay()
        return [o.clone() for o in outs]

    run.graph = g  # type: ignore[attr-defined]  # keep it alive
    return run


def bind_to_buffer(module: torch.nn.Module, layout, aliases: dict[str, str], buf: torch.Tensor) -> None:  # noqa: ANN001
    """Point the module's tensors at views of one device buffer laid out like the host store."""
    from swapserve.artifact.manifest import dtype_from_name

    views = {s.name: buf[s.offset:s.offset + s.nbytes].view(dtype_from_name(s.dtype)).view(s.shape)
             for s in layout.slots}
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    for name, t in state.items():
        v = views.get(aliases.get(name, name))
        if v is not None:
            t.data = v


def bench_one(name: str, dtype: torch.dtype, engines: dict[str, SwapEngine], store: HostStore, workdir: Path,
              runs: int, warmup: int, bw: float) -> dict:
    z = zoo.get(name)
    dname = str(dtype).removeprefix("torch.")
    key = f"{name}-{dname}"
    module = z.build(dtype)
    x_cpu = z.example(1, dtype)
    x = tuple(t.cuda() for t in x_cpu)
    row: dict = {"model": name, "dtype": dname}

    t0 = time.perf_counter()
    build_artifact(module, x_cpu, workdir / key, name=key, max_batch=8, overwrite=True)
    row["export_s"] = time.perf_counter() - t0
    art = load_artifact(workdir / key)
    row["bytes"] = art.manifest.nbytes

    # Resident eager and graph.
    gpu = z.build(dtype).cuda()
    with torch.no_grad():
        ref = gpu(*x)
        row["native_ms"], _ = timed(lambda: gpu(*x), runs, warmup)
        run_graph = graph_of(gpu, x)
        row["native_graph_ms"], _ = timed(run_graph, runs, warmup)
    del gpu, run_graph
    gc.collect()
    torch.cuda.empty_cache()

    # On demand: .to("cuda") from pageable memory, then run.
    cpu_mod = z.build(dtype)
    with torch.no_grad():
        row["ondemand_ms"], _ = timed(lambda: cpu_mod.to("cuda")(*x), runs, 1,
                                      after=lambda: cpu_mod.to("cpu"))
    del cpu_mod

    # swapserve, graph mode (the default) and eager mode.
    eg, ee = engines["graph"], engines["eager"]
    t0 = time.perf_counter()
    eg.add(key, art)
    t1 = time.perf_counter()
    first = eg.infer(key, x)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    row["first_swap_ms"] = (t2 - t0) * 1e3
    row["first_swap_add_ms"] = (t1 - t0) * 1e3
    row["first_swap_capture_ms"] = (t2 - t1) * 1e3
    outs: dict[str, list[torch.Tensor]] = {}

    def cold(e: SwapEngine, tag: str) -> Callable[[], None]:
        def run() -> None:
            outs[tag] = e.infer(key, x)
        return run

    row["swapserve_ms"], _ = timed(cold(eg, "graph-swap"), runs, warmup, before=lambda: eg.evict(key))
    row["swap_cpu_ms"] = statistics.median(eg.stats.swap_cpu_seconds[-runs:]) * 1e3
    row["swapserve_resident_ms"], _ = timed(cold(eg, "graph-resident"), runs, warmup)
    ee.add(key, art)
    row["swapserve_eager_ms"], _ = timed(cold(ee, "eager-swap"), runs, warmup, before=lambda: ee.evict(key))
    row["swap_eager_cpu_ms"] = statistics.median(ee.stats.swap_cpu_seconds[-runs:]) * 1e3
    row["swapserve_eager_resident_ms"], _ = timed(cold(ee, "eager-resident"), runs, warmup)
    row["bit_identical_graph"] = bits_equal(outs["graph-swap"], outs["graph-resident"])
    row["bit_identical_eager"] = bits_equal(outs["eager-swap"], outs["eager-resident"])
    row["bit_identical_first"] = bits_equal(first, outs["graph-resident"])
    row["finite_outputs"] = all(bool(torch.isfinite(o).all()) for o in outs["graph-swap"])
    r = ref if isinstance(ref, torch.Tensor) else ref[0]
    row["max_abs_diff_vs_module"] = float((outs["graph-swap"][0].float() - r.float()).abs().max())

    # Bulk: one pinned copy of the whole buffer (the store's pinned buffer), then an eager run.
    entry = store.acquire(key)
    try:
        host = entry.buffer
        buf = torch.empty(entry.nbytes, dtype=torch.uint8, device="cuda")
        bulk_mod = z.build(dtype).cuda()
        bind_to_buffer(bulk_mod, entry.layout, art.manifest.aliases, buf)

        def bulk() -> None:
            buf.copy_(host, non_blocking=True)
            with torch.no_grad():
                bulk_mod(*x)

        row["bulk_ms"], _ = timed(bulk, runs, warmup)
        del bulk_mod, buf
    finally:
        store.release(key)

    row["floor_ms"] = row["bytes"] / (bw * 1e9) * 1e3
    row["limit_ms"] = max(row["floor_ms"], row["native_graph_ms"])
    row["vs_limit"] = row["swapserve_ms"] / row["limit_ms"]
    row["ondemand_over_swapserve"] = row["ondemand_ms"] / row["swapserve_ms"]

    for e in (eg, ee):
        e.remove(key)
    store.remove(key)
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default=",".join(zoo.BENCHMARK_ZOO))
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pool-gib", type=float, default=3.0)
    ap.add_argument("--workspace-gib", type=float, default=2.0)
    ap.add_argument("--min-chunk-mib", type=float, default=EngineConfig.min_chunk_bytes / MiB)
    ap.add_argument("--max-chunk-mib", type=float, default=EngineConfig.max_chunk_bytes / MiB)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("swap_latency needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    bw = h2d_bandwidth()
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "h2d_pinned_GBps": bw,
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "batch": 1,
        "runs": args.runs,
        "chunk_mib": [args.min_chunk_mib, args.max_chunk_mib],
        "models": [],
    }
    print(f"{result['gpu']}: pinned host→device {bw:.1f} GB/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="swapserve-bench-"))
    store = HostStore(env().shm_dir / f"swapserve-bench-{os.getpid()}", 8 * GiB)
    pool = int(args.pool_gib * GiB) // (32 * MiB) * (32 * MiB)
    engines = {
        mode: SwapEngine(EngineConfig(device="cuda:0", pool_bytes=pool, workspace_bytes=int(args.workspace_gib * GiB),
                                      min_chunk_bytes=int(args.min_chunk_mib * MiB),
                                      max_chunk_bytes=int(args.max_chunk_mib * MiB), mode=mode), store)
        for mode in ("graph", "eager")
    }
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        for name in args.models.split(","):
            t0 = time.perf_counter()
            try:
                row = bench_one(name, dtype, engines, store, work / "artifacts", args.runs, args.warmup, bw)
            except Exception as e:  # noqa: BLE001 - record and go on with the next model
                import traceback

                traceback.print_exc()
                row = {"model": name, "dtype": dname, "error": f"{type(e).__name__}: {e}"}
            result["models"].append(row)
            (args.out / "swap_latency.json").write_text(json.dumps(result, indent=1))
            if "error" not in row:
                print(f"{name:16s} {dname:8s} {row['bytes'] / 1e6:8.1f}MB native {row['native_ms']:7.2f} "
                      f"graph {row['native_graph_ms']:7.2f} floor {row['floor_ms']:7.2f} ondemand "
                      f"{row['ondemand_ms']:8.2f} bulk {row['bulk_ms']:7.2f} swapserve {row['swapserve_ms']:7.2f} "
                      f"(x{row['vs_limit']:.2f} of limit; eager {row['swapserve_eager_ms']:.2f}) first "
                      f"{row['first_swap_ms']:.0f} cpu {row['swap_cpu_ms']:.2f} "
                      f"bitident {row['bit_identical_graph']}/{row['bit_identical_eager']} "
                      f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    for e in engines.values():
        e.close()
    store.close()
    from report_swap_latency import render

    render(result, args.out)


if __name__ == "__main__":
    main()
