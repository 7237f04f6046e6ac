"""How much real inference runs slow each other when K of them run at once on one GPU, one per side lane.

A device may have up to four lanes (``EngineConfig.lanes``, ``MAX_LANES``): whether more lanes per GPU help
depends on how much concurrent runs slow each other, and this also checks the start-up probe's figure. One
engine with ``--lanes`` lanes holds every model of ``--models`` (fp16, batch 1, graph mode on CUDA). For each
model and k = 1 .. lanes-1 it runs the model in side lanes 1..k at once (lane 0 is left out: its resident run
replays a different graph, the swap one), one thread per lane, each doing ``--rounds`` back-to-back
``infer(m, x, lane=i)`` calls, started together on a barrier; the figure is the median wall time of a call,
and ``slowdown[k] = p50_k / p50_1``. The mixed row runs a different model in each side lane (lane i runs
models[i-1 mod n]) against each alone. Every output is checked bit for bit against the model's lone lane-1 run.

A call's wall time includes what the lanes' threads pay in Python and for the GIL, as a worker's lanes do (the
switch interval is set to the worker's, ``SWITCH_INTERVAL_S``, on CUDA): each thread copies its inputs into
the graph's, launches one replay and waits for its lane's stream (``Stream.synchronize``, which releases the
GIL while the GPU computes), then clones the outputs. Inputs are on the device beforehand, so that a request's
upload is not counted.

    python bench/lanes.py --out bench/results/<gpu>_<yyyymmdd> [--rounds 50] [--lanes 4] \
        [--models resnet50,efficientnet_b0,vit_b_16,bert-base]

The table (lanes.md) and plot (lanes.png) are drawn from lanes.json (``--render`` redraws them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

from swapserve.artifact import Artifact, build_artifact, load_artifact, zoo
from swapserve.config import MAX_LANES, GiB, MiB, EngineConfig
from swapserve.engine import HostStore, SwapEngine
from swapserve.node.worker import SWITCH_INTERVAL_S, slowdown_beside

Outs = list[list[torch.Tensor]]


def build(names: list[str], work: Path) -> dict[str, tuple[Artifact, tuple[torch.Tensor, ...]]]:
    out = {}
    for name in names:
        z = zoo.get(name)
        x = z.example(1, torch.float16)
        build_artifact(z.build(torch.float16), x, work / name, name=name, max_batch=1)
        out[name] = (load_artifact(work / name), x)
        print(f"built {name}: {out[name][0].manifest.nbytes / MiB:.0f} MiB", flush=True)
    return out


def at_once(eng: SwapEngine, plan: list[tuple[int, str]], xs: dict[str, list[torch.Tensor]],
            rounds: int) -> tuple[dict[int, list[float]], dict[int, Outs]]:
    """Each (lane, model) of ``plan`` in a thread of its own, started together: every call's ms and outputs."""
    barrier = threading.Barrier(len(plan))
    walls: dict[int, list[float]] = {lane: [] for lane, _ in plan}
    outs: dict[int, Outs] = {lane: [] for lane, _ in plan}
    errors: list[BaseException] = []

    def run(lane: int, name: str) -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                t = time.perf_counter()
                o = eng.infer(name, xs[name], lane=lane)
                walls[lane].append((time.perf_counter() - t) * 1e3)
                outs[lane].append(o)
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=p) for p in plan]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return walls, outs


def same(outs: Outs, ref: list[torch.Tensor]) -> bool:
    return all(torch.equal(a.cpu(), b) for o in outs for a, b in zip(o, ref, strict=True))


def measure(arts: dict, work: Path, device: str, lanes: int, rounds: int) -> dict:
    cuda = device.startswith("cuda")
    page = EngineConfig.page_bytes
    need = sum((-(-art.manifest.nbytes // page) + 1) * page for art, _ in arts.values())
    store = HostStore(work / "store", need + GiB)
    eng = SwapEngine(EngineConfig(device=device, mode="graph" if cuda else "eager",  # a CPU run only checks
                                  pool_bytes=max(8 * GiB, need) if cuda else need,
                                  workspace_bytes=512 * MiB, lanes=lanes), store)
    names = list(arts)
    try:
        xs, ref = {}, {}
        for name, (art, x) in arts.items():
            eng.add(name, art)
            xs[name] = [t.to(device) for t in x]
            eng.infer(name, xs[name])  # lane 0: swapped in, its graphs captured
            for lane in range(1, lanes):
                eng.infer(name, xs[name], lane=lane)  # its graph's first replay
            ref[name] = [t.cpu() for t in eng.infer(name, xs[name], lane=1)]
        models: dict[str, dict] = {}
        for name in names:
            row: dict = {"beside": {}, "bit_identical": True}
            for k in range(1, lanes):
                walls, outs = at_once(eng, [(i, name) for i in range(1, k + 1)], xs, rounds)
                p50 = statistics.median(w for ws in walls.values() for w in ws)
                row["bit_identical"] &= all(same(o, ref[name]) for o in outs.values())
                if k == 1:
                    row["alone_p50_ms"] = p50
                else:
                    row["beside"][str(k)] = {"p50_ms": p50, "slowdown": p50 / row["alone_p50_ms"]}
                print(f"{name}: {k} at once, p50 {p50:.3f} ms ({p50 / row['alone_p50_ms']:.2f}x)", flush=True)
            models[name] = row
        k = lanes - 1
        plan = [(i, names[(i - 1) % len(names)]) for i in range(1, k + 1)]
        walls, outs = at_once(eng, plan, xs, rounds)
        mixed: dict = {"k": k, "bit_identical": all(same(outs[i], ref[n]) for i, n in plan), "models": {}}
        for name in dict.fromkeys(n for _, n in plan):
            p50 = statistics.median(w for i, n in plan if n == name for w in walls[i])
            alone = models[name]["alone_p50_ms"]
            mixed["models"][name] = {"alone_p50_ms": alone, "beside_p50_ms": p50, "slowdown": p50 / alone}
            print(f"mixed ({k} lanes): {name} p50 {p50:.3f} ms ({p50 / alone:.2f}x)", flush=True)
        return {"models": models, "mixed": mixed}
    finally:
        eng.close()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="resnet50,efficientnet_b0,vit_b_16,bert-base")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--lanes", type=int, default=MAX_LANES, help="lanes of the engine: side lanes 1..LANES-1 run")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--render", action="store_true", help="only redraw the table and plot from OUT/lanes.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(json.loads((args.out / "lanes.json").read_text()), args.out)
        return
    if args.lanes < 2:
        ap.error("--lanes must be at least 2 (one side lane)")
    cuda = args.device.startswith("cuda")
    if cuda:  # as a GPU worker runs its lanes' threads
        torch.set_num_threads(1)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    with tempfile.TemporaryDirectory(prefix="lanes-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        arts = build(args.models.split(","), work)
        result = {"gpu": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                  "date": date.today().isoformat(), "rounds": args.rounds, "lanes": args.lanes,
                  "switch_interval_s": sys.getswitchinterval(),
                  **measure(arts, work, args.device, args.lanes, args.rounds),
                  # What the node's start-up probe makes of this card (the scheduler's figure), beside the models'.
                  "probe_beside": list(slowdown_beside(torch.device(args.device), args.lanes)) if cuda else []}
    (args.out / "lanes.json").write_text(json.dumps(result, indent=1))
    render(result, args.out)


def render(result: dict, out: Path) -> None:
    """lanes.md (table) and lanes.png (plot) from a result."""
    ks = range(2, result["lanes"])
    rows = ["| model | alone p50 | " + " | ".join(f"{k} at once: p50 | slowdown" for k in ks) + " | bit-identical |",
            "|---|---:|" + "---:|---:|" * len(ks) + "---|"]
    for name, r in result["models"].items():
        cells = " | ".join(f"{r['beside'][str(k)]['p50_ms']:.3f} | {r['beside'][str(k)]['slowdown']:.2f}x" for k in ks)
        rows.append(f"| {name} | {r['alone_p50_ms']:.3f} | {cells} | {r['bit_identical']} |")
    mx = result["mixed"]
    mixed = [f"Mixed: {mx['k']} side lanes, each a different model (bit-identical: {mx['bit_identical']}).", "",
             "| model | alone p50 | beside the others p50 | slowdown |", "|---|---:|---:|---:|"]
    mixed += [f"| {n} | {r['alone_p50_ms']:.3f} | {r['beside_p50_ms']:.3f} | {r['slowdown']:.2f}x |"
              for n, r in mx["models"].items()]
    probe = result.get("probe_beside") or []
    mixed += ["", "The node's start-up probe (`slowdown_beside`, the scheduler's figure): " + (", ".join(
        f"{k + 2} at once {x:.2f}x" for k, x in enumerate(probe)) if probe else "not run (no GPU).")]
    (out / "lanes.md").write_text(f"# K runs at once, one per side lane — {result['gpu']}, {result['date']}\n\n"
                                  f"ms per call (wall, threads included), {result['rounds']} rounds per lane, fp16, "
                                  f"batch 1 (bench/lanes.py).\n\n" + "\n".join(rows) + "\n\n" + "\n".join(mixed) + "\n")
    print("\n".join(rows + [""] + mixed))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, r in result["models"].items():
        line, = ax.plot([1, *ks], [1.0] + [r["beside"][str(k)]["slowdown"] for k in ks], marker="o", label=name)
        if name in mx["models"]:
            ax.plot([mx["k"]], [mx["models"][name]["slowdown"]], marker="x", ms=9, color=line.get_color(), ls="")
    ax.plot([], [], marker="x", color="gray", ls="", label="mixed (each lane a different model)")
    if probe:
        ax.plot(list(range(1, len(probe) + 2)), [1.0, *probe], ls="--", color="gray", label="start-up probe")
    ax.set_xticks(list(range(1, result["lanes"])))
    ax.set_xlabel("runs at once (side lanes)")
    ax.set_ylabel("slowdown of a call's p50")
    ax.set_title(f"Runs at once, one per lane — {result['gpu']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lanes.png", dpi=120)


if __name__ == "__main__":
    main()
