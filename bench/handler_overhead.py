"""Handler overhead, through the real node: a request to a function with a trivial handler vs the same model
deployed without one, over HTTP; the cost of redirecting one model call (1 MiB in, 1 MiB out); sandbox
cold starts.

A ``swapserve serve`` process (bench/node_harness.py) serves three functions built from one model (a 1x1
convolution on a 1 MiB fp32 tensor):

  conv1mib          no handler: the request goes straight to the model
  conv1mib-handler  handle() = one call of the model, its output returned
  conv1mib-calls    handle() = ``parameters["calls"]`` sequential calls of the model (0, 1, 8)

Each is called sequentially over one keep-alive connection with the binary tensor extension (1 MiB each
way), so HTTP and encoding cost the same for all, and the differences are the handler's.

  direct_p50_ms                 conv1mib, end to end
  handler_p50_ms                conv1mib-handler, end to end
  handler_added_p50_ms          the difference
  node_call_p50_ms_1MB          per model call from a handler, through the node (scheduler, worker, model run
                                included): (p50 with 8 calls - p50 with none) / 8
  redirect_p50_ms_1MB           per model call, the redirection alone (arena copies, messages, checks; no
                                serialization of tensor data): the same handler in a sandbox pool of this
                                process whose ``call_model`` is an echo, (p50 with 8 calls - with none) / 8
  cold_start_ms                 median start of a sandbox forked from the zygote (process, isolation, import,
                                setup), as the node starts them

    python bench/handler_overhead.py --out bench/results/<gpu>_<yyyymmdd> [--devices cuda:0] [--requests 2000]

Writes handler_overhead.json {"gpu", "redirect_p50_ms_1MB", "handler_added_p50_ms", "cold_start_ms", ...}
handler_overhead.md and handler_overhead.png (``--render`` redraws the plot from the JSON). Runs on a CPU
as well (--devices cpu).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import Server  # noqa: E402
from stats import percentile  # noqa: E402
from swapserve.client import Client  # noqa: E402
from swapserve.functions.build import build_bundle  # noqa: E402
from swapserve.functions.bundle import pack  # noqa: E402
from swapserve.functions.spec import TensorDecl  # noqa: E402
from swapserve.gateway import oip  # noqa: E402
from swapserve.sandbox import ModelSignature, SandboxConfig, SandboxPool  # noqa: E402
from swapserve.sandbox.launcher import SpawnLauncher, ZygoteLauncher  # noqa: E402

SHAPE = (1, 4, 256, 256)  # fp32: 1 MiB
MODEL = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Conv2d(4, 4, 1).eval(), (torch.randn(1, 4, 256, 256),)
"""
TRIVIAL = """
def handle(request, models):
    (y,) = models["model"](request.inputs["x"]).result().values()
    return {"y": y}
"""
CALLS = """
def handle(request, models):
    x = request.inputs["x"]
    for _ in range(int(request.parameters["calls"])):
        (x,) = models["model"](x).result().values()
    return {"y": x}
"""
ECHO_CALLS = CALLS.replace('models["model"]', 'models["echo"]')


def function(root: Path, name: str, handler: str | None) -> Path:
    """Build the function's bundle (as ``swapserve deploy`` does) and pack it."""
    src = root / "src" / name
    src.mkdir(parents=True)
    spec = {"name": name, "model": {"python": "model.py:build"}, "slo_ms": 1000, "max_batch": 1,
            "late_policy": "serve", "inputs": [{"name": "x", "datatype": "FP32", "shape": list(SHAPE)}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(SHAPE)}]}
    if handler:
        spec["handler"] = "handler.py"
    (src / "function.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (src / "model.py").write_text(MODEL)
    if handler:
        (src / "handler.py").write_text(handler)
    build_bundle(src, root / "bundles" / name, progress=lambda line: None)
    return pack(root / "bundles" / name)


class Http:
    """Sequential binary OIP requests over one keep-alive connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port)

    def infer(self, name: str, x: torch.Tensor, parameters: dict[str, Any] | None = None) -> torch.Tensor:
        enc = oip.encode_infer_request({"x": x}, binary_inputs=True, binary_outputs=True, parameters=parameters)
        self.conn.request("POST", f"/v2/models/{name}/infer", enc.body, {oip.HEADER_LENGTH: str(enc.header_length)})
        r = self.conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"{name}: HTTP {r.status} {body[:300]!r}")
        return oip.decode_infer_response(body, r.getheader(oip.HEADER_LENGTH))[1]["y"]

    def timed(self, n: int, warmup: int, *args: Any) -> list[float]:
        out = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            self.infer(*args)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
        return out


def over_http(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    archives = {name: function(root, name, handler) for name, handler in
                (("conv1mib", None), ("conv1mib-handler", TRIVIAL), ("conv1mib-calls", CALLS))}
    server = Server(root / "home", args.devices, workspace="1GiB")
    try:
        server.wait_ready()
        client = Client(server.url, server.token)
        for archive in archives.values():
            client.deploy(archive)
        h = Http(server.port)
        x = torch.randn(SHAPE)
        direct = h.infer("conv1mib", x)
        assert torch.equal(h.infer("conv1mib-handler", x), direct), "the handler's answer differs from the model's"
        med = statistics.median
        d = h.timed(args.requests, args.warmup, "conv1mib", x)
        hd = h.timed(args.requests, args.warmup, "conv1mib-handler", x)
        by_calls = {k: h.timed(args.requests // 2, args.warmup, "conv1mib-calls", x, {"calls": k}) for k in (0, 1, 8)}
    finally:
        server.stop()
    return {"direct_p50_ms": med(d), "direct_p99_ms": percentile(d, 99), "handler_p50_ms": med(hd),
            "handler_p99_ms": percentile(hd, 99), "handler_added_p50_ms": med(hd) - med(d),
            "node_call_p50_ms_1MB": (med(by_calls[8]) - med(by_calls[0])) / 8,
            "handler_p50_ms_by_calls": {str(k): med(v) for k, v in by_calls.items()}}


async def in_process(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The redirection alone (an echo ``call_model``), and cold starts, on the node's own sandbox code.
    This process stands in for the controller, so it runs the controller's event loop (uvloop) and copies as the
    controller does: with one torch thread
    (``swapserve serve`` sets that; with torch's pool, each 1 MiB arena copy wakes its threads: 3.5× slower
    on the CI VM)."""
    torch.set_num_threads(1)
    src = root / "sandbox"
    src.mkdir()
    (src / "handler.py").write_text(TRIVIAL)
    (src / "calls.py").write_text(ECHO_CALLS)
    decl = (TensorDecl("x", "FP32", SHAPE),)
    sig = ModelSignature(decl, decl, 1)

    async def echo(function: str, model: str, inputs: dict[str, torch.Tensor], deadline: float,
                   sink: Any = None) -> dict[str, torch.Tensor]:
        # The output written where the sink says, as the node's dispatcher writes a model's out of the IO slab:
        # the one copy of the output the redirection costs.
        out = sink.place("x", inputs["x"]) if sink is not None else None
        return {"x": out.copy_(inputs["x"]) if out is not None else inputs["x"].clone()}

    cfg = SandboxConfig(handler_output="discard", deny_paths=(root / "home",))
    launcher = ZygoteLauncher(cfg.limits)
    t0 = time.perf_counter()
    await launcher.start()
    zygote_ms = (time.perf_counter() - t0) * 1e3
    x = torch.randn(SHAPE)
    med = statistics.median
    try:
        pool = SandboxPool("redirect", src, "calls.py", {"echo": sig}, echo, launcher, cfg)
        await pool.warm_up(1)
        by_calls: dict[int, list[float]] = {}
        for k in (0, 1, 8):
            times = []
            for i in range(args.warmup + args.requests // 2):
                t = time.perf_counter()
                await pool.infer({"x": x}, {"calls": k})
                if i >= args.warmup:
                    times.append((time.perf_counter() - t) * 1e3)
            by_calls[k] = times
        await pool.close()
        colds = []
        for i in range(args.cold_starts):
            p = SandboxPool(f"cold{i}", src, "handler.py", {"model": sig}, echo, launcher, cfg)
            await p.warm_up(1)
            colds.append(p.stats().cold_starts[-1])
            isolation = p.stats().isolation
            await p.close()
        spawned = SandboxPool("spawned", src, "handler.py", {"model": sig}, echo, SpawnLauncher(), cfg)
        await spawned.warm_up(1)
        spawn = spawned.stats().cold_starts[-1]
        await spawned.close()
    finally:
        await launcher.close()
    return {"zygote_start_ms": zygote_ms,
            "redirect_p50_ms_1MB": (med(by_calls[8]) - med(by_calls[0])) / 8,
            "redirect_one_call_p50_ms_1MB": med(by_calls[1]) - med(by_calls[0]),
            "sandbox_request_p50_ms_by_calls": {str(k): med(v) for k, v in by_calls.items()},
            "cold_start_ms": med(c.total_ms for c in colds),
            "cold_start_parts_ms": {part: med(getattr(c, part) for c in colds)
                                    for part in ("fork_ms", "isolate_ms", "import_ms", "setup_ms")},
            "cold_start_spawn_ms": spawn.total_ms, "isolation": isolation}


def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="handler-overhead-"))
    devices = args.devices.split(",")
    gpu = torch.cuda.get_device_name(int(devices[0].split(":")[1])) if devices[0].startswith("cuda") else "cpu"
    result: dict[str, Any] = {"gpu": gpu, "date": date.today().isoformat(), "devices": devices,
                              "requests": args.requests, "tensor_bytes": int(torch.randn(SHAPE).numel() * 4)}
    result.update(over_http(args, root))
    try:  # the event loop the controller runs (swapserve.node.serve)
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result.update(asyncio.run(in_process(args, root)))
    return result


def plot(r: dict[str, Any], out: Path) -> None:
    """handler_overhead.png: the request-path costs (the fresh-interpreter and zygote starts, seconds long,
    are in the table)."""
    from bars import bars

    bars(out / "handler_overhead.png", f"Handler overhead — {r['gpu']}, {r['date']}",
         [("request, no handler (p50)", r["direct_p50_ms"]), ("request through a trivial handler (p50)",
                                                               r["handler_p50_ms"]),
          ("added by the handler (p50)", r["handler_added_p50_ms"]),
          ("one model call through the node (p50)", r["node_call_p50_ms_1MB"]),
          ("redirect of a 1 MiB call (p50; target 0.3)", r["redirect_p50_ms_1MB"]),
          ("sandbox cold start, zygote fork", r["cold_start_ms"])])


def report(r: dict[str, Any]) -> str:
    rows = [("request, no handler, over HTTP (p50)", r["direct_p50_ms"]),
            ("request through a trivial handler, over HTTP (p50)", r["handler_p50_ms"]),
            ("added by the handler (p50)", r["handler_added_p50_ms"]),
            ("one model call from a handler, through the node (p50)", r["node_call_p50_ms_1MB"]),
            ("redirect of one model call, 1 MiB each way, echo (p50)", r["redirect_p50_ms_1MB"]),
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
    ap.add_argument("--render", action="store_true", help="only redraw the plot from OUT/handler_overhead.json")
    a = ap.parse_args()
    if a.render:
        plot(json.loads((a.out / "handler_overhead.json").read_text()), a.out)
        raise SystemExit(0)
    logging.basicConfig(level=logging.WARNING)
    res = main(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "handler_overhead.json").write_text(json.dumps(res, indent=1))
    (a.out / "handler_overhead.md").write_text(report(res))
    plot(res, a.out)
    print(report(res))
