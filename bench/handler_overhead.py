"""Handler overhead: a request through a trivial handler vs the same model without one, the cost of
redirecting one model call (1 MiB in, 1 MiB out), and sandbox cold starts.

Everything in this one process, as the node will run it: a real controller (``swapserve.node.controller.Node``)
with one worker process per device, and a ``SandboxManager`` whose ``call_model`` is the node's own
``infer`` (the integration the controller will make; the request's deadline is not passed on yet).

  direct_p50_ms         node.infer of the model (1 MiB in and out), resident
  handler_p50_ms        the same request through a handler that calls the model once and returns its output
  handler_added_p50_ms  the difference
  redirect_p50_ms_1MB   per model call: (p50 with 8 sequential calls - p50 with none) / 8, the model being an
                        echo answered in the controller, so only the redirection is timed (arena copies,
                        messages, checks) — no serialization of tensor data
  cold_start_ms         median start of a sandbox forked from the zygote (process, isolation, import, setup)

    python bench/handler_overhead.py --out bench/results/<gpu>_<yyyymmdd> [--devices cuda:0] [--requests 2000]

Writes handler_overhead.json {"gpu", "redirect_p50_ms_1MB", "handler_added_p50_ms", "cold_start_ms", ...}
and handler_overhead.md. Runs on a CPU as well (--devices cpu), for checking the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapserve.functions.build import build_bundle  # noqa: E402
from swapserve.functions.spec import TensorDecl, load_spec  # noqa: E402
from swapserve.node.controller import Node, NodeConfig  # noqa: E402
from swapserve.sandbox import ModelSignature, SandboxConfig, SandboxManager, SandboxPool  # noqa: E402
from swapserve.sandbox.launcher import SpawnLauncher  # noqa: E402

NAME = "conv1mib"
SHAPE = (1, 4, 256, 256)  # fp32: 1 MiB
SPEC = f"""
name: {NAME}
model: {{python: model.py:build}}
slo_ms: 1000
max_batch: 1
late_policy: serve
inputs:  [{{name: x, datatype: FP32, shape: [1, 4, 256, 256]}}]
outputs: [{{name: y, datatype: FP32, shape: [1, 4, 256, 256]}}]
handler: handler.py
"""
MODEL = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Conv2d(4, 4, 1).eval(), (torch.randn(1, 4, 256, 256),)
"""
TRIVIAL = """
def handle(request, models):
    return models["model"](request.inputs["x"]).result()
"""
REDIRECT = """
def handle(request, models):
    x = request.inputs["x"]
    for _ in range(request.parameters["calls"]):
        x = models["echo"](x).result()["y"]
    return {"y": x}
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def timed(fn: Any, n: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        await fn()
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="handler-overhead-"))
    src = root / "src"
    src.mkdir()
    (src / "function.yaml").write_text(SPEC)
    (src / "model.py").write_text(MODEL)
    (src / "handler.py").write_text(TRIVIAL)
    (src / "redirect.py").write_text(REDIRECT)
    build_bundle(src, root / "bundle", progress=lambda line: None)
    spec = load_spec(src)
    devices = tuple(args.devices.split(","))
    node = Node(NodeConfig(root / "home", devices, None, workspace_bytes=1 << 30))
    await node.start()
    await node.deploy(root / "bundle")
    x = torch.randn(SHAPE)
    if devices[0].startswith("cuda"):
        gpu = torch.cuda.get_device_name(int(devices[0].split(":")[1]))
    else:
        gpu = "cpu"

    async def via_node(function: str, model: str, inputs: dict[str, torch.Tensor], deadline: float) -> dict[str, torch.Tensor]:
        return (await node.infer(NAME, inputs)).outputs

    async def echo(function: str, model: str, inputs: dict[str, torch.Tensor], deadline: float) -> dict[str, torch.Tensor]:
        return {"y": inputs["x"]}  # a view of the sandbox's arena: the pool copies it back, as it would real outputs

    cfg = SandboxConfig(handler_output="discard", deny_paths=(root / "home",))
    manager = SandboxManager(via_node, cfg)
    t0 = time.perf_counter()
    await manager.start()
    zygote_ms = (time.perf_counter() - t0) * 1e3
    result: dict[str, Any] = {"gpu": gpu, "date": date.today().isoformat(), "devices": list(devices),
                              "requests": args.requests, "tensor_bytes": x.numel() * 4, "zygote_start_ms": zygote_ms}
    try:
        direct = await timed(lambda: node.infer(NAME, {"x": x}), args.requests, args.warmup)
        pool = manager.add(NAME, src, "handler.py", {"model": ModelSignature.of(spec)})
        await pool.warm_up(1)
        out = await pool.infer({"x": x})
        ref = (await node.infer(NAME, {"x": x})).outputs["y"]
        assert torch.equal(out.outputs["y"], ref), "the handler's answer differs from the model's"
        handled = await timed(lambda: pool.infer({"x": x}), args.requests, args.warmup)

        sig = ModelSignature((TensorDecl("x", "FP32", (-1, *SHAPE[1:])),), (TensorDecl("y", "FP32", (-1, *SHAPE[1:])),), 1)
        redirect = SandboxPool("redirect", src, "redirect.py", {"echo": sig}, echo, manager.launcher, cfg)
        await redirect.warm_up(1)
        by_calls = {k: await timed(lambda k=k: redirect.infer({"x": x}, {"calls": k}), args.requests // 2, args.warmup)
                    for k in (0, 1, 8)}
        await redirect.close()

        colds = []
        for i in range(args.cold_starts):
            p = SandboxPool(f"cold{i}", src, "handler.py", {"model": ModelSignature.of(spec)}, via_node, manager.launcher, cfg)
            await p.warm_up(1)
            colds.append(p.stats().cold_starts[-1])
            isolation = p.stats().isolation
            await p.close()
        spawned = SandboxPool("spawned", src, "handler.py", {"model": ModelSignature.of(spec)}, via_node, SpawnLauncher(), cfg)
        await spawned.warm_up(1)
        spawn = spawned.stats().cold_starts[-1]
        await spawned.close()
    finally:
        await manager.close()
        await node.stop()

    med = statistics.median
    result.update({
        "direct_p50_ms": med(direct), "direct_p99_ms": pct(direct, 99),
        "handler_p50_ms": med(handled), "handler_p99_ms": pct(handled, 99),
        "handler_added_p50_ms": med(handled) - med(direct),
        "redirect_p50_ms_1MB": (med(by_calls[8]) - med(by_calls[0])) / 8,
        "redirect_one_call_p50_ms_1MB": med(by_calls[1]) - med(by_calls[0]),
        "sandbox_request_p50_ms_by_calls": {str(k): med(v) for k, v in by_calls.items()},
        "cold_start_ms": med(c.total_ms for c in colds),
        "cold_start_parts_ms": {part: med(getattr(c, part) for c in colds)
                                for part in ("fork_ms", "isolate_ms", "import_ms", "setup_ms")},
        "cold_start_spawn_ms": spawn.total_ms,
        "isolation": isolation,
    })
    return result


def report(r: dict[str, Any]) -> str:
    rows = [("request, no handler (p50)", r["direct_p50_ms"]), ("request through a trivial handler (p50)", r["handler_p50_ms"]),
            ("added by the handler (p50)", r["handler_added_p50_ms"]),
            ("redirect of one model call, 1 MiB each way (p50)", r["redirect_p50_ms_1MB"]),
            ("sandbox cold start, zygote fork (median)", r["cold_start_ms"]),
            ("sandbox cold start, fresh interpreter", r["cold_start_spawn_ms"]), ("zygote start", r["zygote_start_ms"])]
    lines = [f"# Handler overhead — {r['gpu']}, {r['date']}", "", "| what | ms |", "| --- | ---: |"]
    lines += [f"| {name} | {v:.3f} |" for name, v in rows]
    lines += ["", f"Cold start parts (ms): {json.dumps({k: round(v, 2) for k, v in r['cold_start_parts_ms'].items()})}",
              "", f"Isolation: {json.dumps(r['isolation'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--devices", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cold-starts", type=int, default=10)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = asyncio.run(main(a))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "handler_overhead.json").write_text(json.dumps(res, indent=1))
    (a.out / "handler_overhead.md").write_text(report(res))
    print(report(res))
