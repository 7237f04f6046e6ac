"""A resident model's request while another model swaps in, with one lane per GPU and with two.

Head-of-line blocking is what the node's trace showed for 10 ms SLOs: with one lane, a request for a
model already on the GPU waits for a whole swap of a big one (13-17 ms for bert-large or GPT-2 medium in
fp16 on an H200). With two lanes it runs in the second lane beside the swap. Both engines run in this
process on the same card, one after the other: a small resident model ("hit", an fp16 MLP) and a big one
("big", 640 MiB of fp16 weights) that is evicted before every round. Each round starts the big model's
swap in lane 0 from a thread, waits ``--delay-ms``, then times the hit's run (lane 1 with two lanes;
lane 0, behind the swap, with one) on the host clock, and checks its answer against the resident run's,
bit for bit.

    python bench/side_lane.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 30]

The table (side_lane.md) and plot (side_lane.png) are drawn from side_lane.json (``--render`` redraws them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from swapserve.artifact import build_artifact, load_artifact
from swapserve.config import GiB, MiB, EngineConfig
from swapserve.engine import HostStore, SwapEngine


def mlp(width: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).half().eval()


def build(work: Path) -> dict[str, tuple[object, torch.Tensor]]:
    out = {}
    for name, width, depth in (("hit", 2048, 24), ("big", 4096, 20)):
        module = mlp(width, depth, seed=len(name))
        x = torch.randn(1, width, dtype=torch.float16)
        build_artifact(module, (x,), work / name, name=name, max_batch=1)
        out[name] = (load_artifact(work / name), x)
    return out


def run_lanes(lanes: int, arts: dict, work: Path, device: str, rounds: int, delay_s: float) -> dict:
    store = HostStore(work / f"store-{lanes}", 4 * GiB)
    mode = "graph" if device.startswith("cuda") else "eager"  # a CPU run only checks the script
    eng = SwapEngine(EngineConfig(device=device, mode=mode, pool_bytes=4 * GiB, workspace_bytes=256 * MiB,
                                  lanes=lanes), store)
    try:
        for name, (art, _) in arts.items():
            eng.add(name, art)
        (_, xh), (_, xb) = arts["hit"], arts["big"]
        eng.infer("big", [xb])
        ref = [o.cpu() for o in eng.infer("hit", [xh])]
        alone = []
        for _ in range(rounds):
            t = time.perf_counter()
            eng.infer("hit", [xh], lane=lanes - 1)
            alone.append((time.perf_counter() - t) * 1e3)
        swap_alone = []
        for _ in range(5):
            eng.evict("big")
            t = time.perf_counter()
            eng.infer("big", [xb])
            swap_alone.append((time.perf_counter() - t) * 1e3)
        beside, swaps, identical = [], [], True
        for _ in range(rounds):
            eng.evict("big")
            started = threading.Event()
            took: list[float] = []

            def swap() -> None:
                t0 = time.perf_counter()
                started.set()
                eng.infer("big", [xb])
                took.append((time.perf_counter() - t0) * 1e3)

            th = threading.Thread(target=swap)
            th.start()
            started.wait()
            time.sleep(delay_s)
            t = time.perf_counter()
            out = eng.infer("hit", [xh], lane=lanes - 1)
            beside.append((time.perf_counter() - t) * 1e3)
            th.join()
            swaps.append(took[0])
            identical &= all(torch.equal(a.cpu(), b) for a, b in zip(out, ref))
        return {"hit_alone_p50_ms": statistics.median(alone), "big_swap_alone_p50_ms": statistics.median(swap_alone),
                "hit_during_swap_p50_ms": statistics.median(beside), "hit_during_swap_max_ms": max(beside),
                "big_swap_with_hit_p50_ms": statistics.median(swaps), "bit_identical": identical,
                "rounds": rounds}
    finally:
        eng.close()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--delay-ms", type=float, default=1.0, help="after the swap starts, before the hit is sent")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--render", action="store_true", help="only redraw the table and plot from OUT/side_lane.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(json.loads((args.out / "side_lane.json").read_text()), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="side-lane-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        arts = build(work)
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
        result = {"gpu": gpu, "date": date.today().isoformat(), "delay_ms": args.delay_ms,
                  "lanes": {str(n): run_lanes(n, arts, work, args.device, args.rounds, args.delay_ms / 1e3)
                            for n in (1, 2)}}
    (args.out / "side_lane.json").write_text(json.dumps(result, indent=1))
    render(result, args.out)


def render(result: dict, out: Path) -> None:
    """side_lane.md (table) and side_lane.png (plot) from a result."""
    rows = ["| lanes | hit alone | big swap alone | hit during the swap (p50) | (max) | the swap, with the hit | "
            "bit-identical |", "|---:|---:|---:|---:|---:|---:|---|"]
    for n, r in result["lanes"].items():
        rows.append(f"| {n} | {r['hit_alone_p50_ms']:.2f} | {r['big_swap_alone_p50_ms']:.2f} | "
                    f"{r['hit_during_swap_p50_ms']:.2f} | {r['hit_during_swap_max_ms']:.2f} | "
                    f"{r['big_swap_with_hit_p50_ms']:.2f} | {r['bit_identical']} |")
    rounds = next(iter(result["lanes"].values()))["rounds"]
    (out / "side_lane.md").write_text(f"# A hit during a swap — {result['gpu']}, {result['date']}\n\n"
                                      f"ms, {rounds} rounds, the hit sent {result['delay_ms']} ms after the swap "
                                      "started (bench/side_lane.py).\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["hit alone", "hit during a swap (p50)", "hit during a swap (max)", "the swap"]
    keys = ["hit_alone_p50_ms", "hit_during_swap_p50_ms", "hit_during_swap_max_ms", "big_swap_with_hit_p50_ms"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(result["lanes"])
    for j, (n, r) in enumerate(result["lanes"].items()):
        ax.bar([i + j * width for i in range(len(keys))], [r[k] for k in keys], width, label=f"{n} lane(s)")
    ax.set_xticks([i + width * (len(result["lanes"]) - 1) / 2 for i in range(len(keys))], labels, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"A resident model's request during a 640 MiB swap — {result['gpu']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "side_lane.png", dpi=120)


if __name__ == "__main__":
    main()
