"""What remapping a swapped model's pages costs on the device, alone and while the GPU is busy.

In the node's trace (bench/results/h200_20261128/session3) the pages phase of a swapped run — pinning,
eviction, remapping its slots onto the pages it took — cost ~0.7 ms whatever the model's size (0.72 ms for
2 pages, 1.27 ms for 17), where the device probe measured ~70 µs per page on an idle GPU. This measures the
engine's own remap (``CudaBackend.unmap`` + ``map``: unmap, map, grant access, per page) of k 32 MiB pages
from one set of physical pages to another, and the same with one ``cuMemSetAccess`` over the whole run of
pages instead of one per page, under three conditions:

  * ``idle``: nothing else queued on the device;
  * ``kernels``: ~20 ms of matrix products queued on another stream (a lane running a model);
  * ``copies``: a 640 MiB host→device copy queued on the copy stream (another model's swap);
  * ``vmm_kernels``: the same matrix products as ``kernels``, reading a range mapped from the pool's pages (a
    lane running a model from the pool, as the side lane does during a swap);
  * ``outputs``: 40 device→host copies of 256 KiB queued on another stream (runs writing their outputs).

Each remap is checked: the bytes written through the range before are read back through it after remapping
back (both ways, every page).

    python bench/remap_cost.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 20]

Writes remap_cost.json, remap_cost.md and remap_cost.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = 32 << 20
PAGES = (1, 4, 16)
CONDITIONS = ("idle", "kernels", "copies", "vmm_kernels", "outputs")


def measure(rounds: int, extra_mappings: int = 0) -> dict:
    import torch

    from swapserve.engine.backend.cuda import CudaBackend, check
    from swapserve.engine.layout import Chunk

    be = CudaBackend("cuda:0", PAGE)
    cu = be._cu
    dev = be.device
    k_max = max(PAGES)
    be.create_pages(2 * k_max + 1)  # two sets: the range moves from one to the other and back; one more page
    # holds the operand of the vmm_kernels condition
    side = torch.cuda.Stream(dev)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    swap_bytes = 640 << 20
    host = torch.empty(swap_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(swap_bytes, dtype=torch.uint8, device=dev)
    chunks = [Chunk(s, s + (2 << 20)) for s in range(0, swap_bytes, 2 << 20)]
    events = be.new_events(len(chunks))
    vmm_va = be.reserve(PAGE)
    be.map(vmm_va, 2 * k_max)
    a_vmm = be.view(vmm_va, PAGE).view(torch.float16)[:4096 * 4096].view(4096, 4096)
    a_vmm.copy_(a)
    out_dev = torch.empty(256 << 10, dtype=torch.uint8, device=dev)
    out_host = torch.empty(256 << 10, dtype=torch.uint8).pin_memory()
    # A node keeps a model's mappings after eviction, so each physical page ends up mapped in many models'
    # ranges: map every page of both sets into this many ranges more.
    extra = []
    for _ in range(extra_mappings):
        r = be.reserve(2 * k_max * PAGE)
        for pg in range(2 * k_max):
            be.map(r + pg * PAGE, pg)
        extra.append(r)

    def load(condition: str) -> None:
        if condition == "kernels":
            with torch.cuda.stream(side):
                for _ in range(80):  # ~20 ms of work on an H100/H200
                    a @ a
        elif condition == "copies":
            be.start_copies(dst.data_ptr(), host, chunks, [True] * len(chunks), events)
        elif condition == "vmm_kernels":
            with torch.cuda.stream(side):
                for _ in range(80):
                    a_vmm @ a_vmm
        elif condition == "outputs":
            with torch.cuda.stream(side):
                for _ in range(40):
                    out_host.copy_(out_dev, non_blocking=True)

    def remap(va: int, k: int, to_set: int, batched: bool) -> tuple[float, float]:
        """The whole remap's ms, and its unmaps' (what a placement skips when the slots were unmapped before)."""
        pages = [to_set * k_max + i for i in range(k)]
        t = time.perf_counter()
        for i in range(k):
            be.unmap(va + i * PAGE)
        unmapped = time.perf_counter()
        if batched:
            for i, pg in enumerate(pages):
                check(cu.cuMemMap(va + i * PAGE, PAGE, 0, be._pages[pg], 0))
            check(cu.cuMemSetAccess(va, k * PAGE, be._access, 1))
        else:
            for i, pg in enumerate(pages):
                be.map(va + i * PAGE, pg)
        return (time.perf_counter() - t) * 1e3, (unmapped - t) * 1e3

    results = []
    for k in PAGES:
        va = be.reserve(k * PAGE)
        for i in range(k):
            be.map(va + i * PAGE, i)  # set 0
        view = be.view(va, k * PAGE)
        marks = torch.arange(k, dtype=torch.uint8, device=dev) + 1
        view.view(k, PAGE)[:, :8] = marks[:, None]  # set 0's bytes, page by page
        for batched in (False, True):
            for condition in CONDITIONS:
                times, unmaps = [], []
                for _ in range(rounds):
                    torch.cuda.synchronize(dev)
                    load(condition)
                    for to_set in (1, 0):  # onto set 1, then back onto set 0
                        total, unmap_ms = remap(va, k, to_set, batched)
                        times.append(total)
                        unmaps.append(unmap_ms)
                    torch.cuda.synchronize(dev)
                    back = be.view(va, k * PAGE).view(k, PAGE)[:, 0].clone()
                    if not torch.equal(back, marks):
                        raise SystemExit(f"remap of {k} pages (batched={batched}, {condition}) lost the bytes")
                p50 = statistics.median(times)
                results.append({"pages": k, "access": "one call per run" if batched else "one call per page",
                                "condition": condition, "p50_ms": p50, "p90_ms": sorted(times)[int(0.9 * len(times))],
                                "per_page_ms": p50 / k, "unmap_p50_ms": statistics.median(unmaps),
                                "unmap_p90_ms": sorted(unmaps)[int(0.9 * len(unmaps))]})
                print(json.dumps(results[-1]), flush=True)
        for i in range(k):
            be.unmap(va + i * PAGE)
        be.release(va, k * PAGE)
    be.unmap(vmm_va)
    be.release(vmm_va, PAGE)
    for r in extra:
        for pg in range(2 * k_max):
            be.unmap(r + pg * PAGE)
        be.release(r, 2 * k_max * PAGE)
    return {"gpu": torch.cuda.get_device_name(dev), "date": date.today().isoformat(), "page_bytes": PAGE,
            "rounds": rounds, "extra_mappings": extra_mappings, "results": results}


def report(result: dict, out: Path) -> None:
    from bars import bars

    rows = result["results"]
    lines = [f"# Remapping a model's pages — {result['gpu']}, {result['date']}", "",
             f"k pages of {PAGE >> 20} MiB moved from one set of physical pages to another (unmap, map, grant "
             f"access), {result['rounds']} rounds each way; p50 (p90) ms.", "",
             "| pages | access | idle | kernels on another stream | a swap's copies queued | kernels on pool pages "
             "| output copies queued |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for k in PAGES:
        for access in ("one call per page", "one call per run"):
            cells = {r["condition"]: r for r in rows if r["pages"] == k and r["access"] == access}
            lines.append(f"| {k} | {access} | " + " | ".join(
                f"{cells[c]['p50_ms']:.3f} ({cells[c]['p90_ms']:.3f})" for c in CONDITIONS) + " |")
    if all("unmap_p50_ms" in r for r in rows):
        lines += ["", "Of which unmapping the old pages (what a placement skips when its slots were unmapped "
                  "before); p50 (p90) ms.", "",
                  "| pages | idle | kernels on another stream | a swap's copies queued | kernels on pool pages "
                  "| output copies queued |", "|---:|---:|---:|---:|---:|---:|"]
        for k in PAGES:
            cells = {r["condition"]: r for r in rows if r["pages"] == k and r["access"] == "one call per page"}
            lines.append(f"| {k} | " + " | ".join(
                f"{cells[c]['unmap_p50_ms']:.3f} ({cells[c]['unmap_p90_ms']:.3f})" for c in CONDITIONS) + " |")
    (out / "remap_cost.md").write_text("\n".join(lines) + "\n")
    bars(out / "remap_cost.png", f"Remap of k 32 MiB pages (p50) — {result['gpu']}",
         [(f"{r['pages']} pages, {r['access']}, {r['condition']}", r["p50_ms"]) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--extra-mappings", type=int, default=0, help="map every page into this many other ranges "
                    "too (as a node's kept mappings do)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.rounds, args.extra_mappings)
    (args.out / "remap_cost.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    print((args.out / "remap_cost.md").read_text())


if __name__ == "__main__":
    main()
