"""CPU time of the node's serving process per request, by the shape of the request: what bounds the requests/s
one node serves. On four H200s the trace's functions missed mostly by time spent outside the GPUs while the
node's one serving process (gateway, controller and scheduler on one asyncio loop) ran late
(bench/results/h200x4_20261128): this measures that process's cost per request.

Starts a real ``swapserve serve``, deploys three functions with the I/O of the trace's models but trivial
compute (so the worker's time does not matter), and sends each, sequentially over one keep-alive connection
with binary tensors as the trace's clients do:

  * ``image``: a 3×224×224 fp16 image in (294 KiB), 1000 fp16 logits out (the CNNs and ViT);
  * ``hidden``: 128 int64 tokens in, 128×768 fp16 out (192 KiB; a BERT-base encoder's last hidden state);
  * ``logits``: 128 int64 tokens in, 128×50257 fp16 out (12.9 MB; GPT-2's logits).

Per shape: the serving process's CPU time (user + system, from /proc) per request, the round trip's p50, and
the node's own time (admission to answer) p50. Writes serving_cost.json, serving_cost.md and serving_cost.png.

    python bench/serving_cost.py --out bench/results/<gpu>_<yyyymmdd> [--devices cuda:0] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import Server  # noqa: E402

from swapserve.tensors import element_size  # noqa: E402

MODEL = '''
import torch
from torch import nn


class Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1000))

    def forward(self, image):
        return (image.mean((2, 3)) @ self.w).to(image.dtype)


class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30522, 768)

    def forward(self, input_ids):
        return self.emb(input_ids)


class Logits(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50257, 1)
        self.w = nn.Parameter(torch.randn(50257))

    def forward(self, input_ids):
        return self.emb(input_ids) * self.w


def build_image():
    torch.manual_seed(0)
    return Image().half().eval(), (torch.randn(1, 3, 224, 224).half(),)


def build_hidden():
    torch.manual_seed(0)
    return Hidden().half().eval(), (torch.randint(0, 30522, (1, 128)),)


def build_logits():
    torch.manual_seed(0)
    return Logits().half().eval(), (torch.randint(0, 50257, (1, 128)),)
'''

SPEC = '''name: {name}
model:
  python: model.py:build_{name}
slo_ms: 1000
max_batch: 8
late_policy: serve
inputs:
  - {{name: {input}, datatype: {in_type}, shape: {in_shape}}}
outputs:
  - {{name: output, datatype: FP16, shape: {out_shape}}}
'''

SHAPES = {  # name: (input name, datatype, shape, output shape)
    "image": ("image", "FP16", [-1, 3, 224, 224], [-1, 1000]),
    "hidden": ("input_ids", "INT64", [-1, 128], [-1, 128, 768]),
    "logits": ("input_ids", "INT64", [-1, 128], [-1, 128, 50257]),
}


def function_dir(root: Path, name: str) -> Path:
    inp, dtype, shape, out_shape = SHAPES[name]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.py").write_text(MODEL)
    (d / "function.yaml").write_text(SPEC.format(name=name, input=inp, in_type=dtype, in_shape=shape,
                                                 out_shape=out_shape))
    return d


def request_body(name: str) -> tuple[bytes, int]:
    import torch

    from swapserve.gateway import oip

    inp, dtype, shape, _ = SHAPES[name]
    x = torch.randn(1, *shape[1:]).half() if dtype == "FP16" else torch.randint(0, 30000, (1, *shape[1:]))
    enc = oip.encode_infer_request({inp: x}, binary_inputs=True, binary_outputs=True)
    return enc.body, enc.header_length


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children: the workers are processes of their own)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, pid: int, fronts: list[int], name: str, n: int, warmup: int) -> dict:
    from http1 import Client  # the traces' client (bench/http1.py)
    from trace import _parameters

    body, hlen = request_body(name)
    headers = {"Inference-Header-Content-Length": str(hlen), "Content-Type": "application/octet-stream"}
    rtt, node = [], []
    client = Client.of(url)
    try:
        for i in range(warmup + n):
            if i == warmup:
                cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
                fronts0 = sum(cpu_seconds(f) for f in fronts)
            t = time.perf_counter()
            r = await client.request("POST", f"/v2/models/{name}/infer", body, headers,
                                     keep_header="inference-header-content-length")
            if r.status != 200:
                raise RuntimeError(f"{name}: HTTP {r.status}: {r.body[:300]!r}")
            rtt.append((time.perf_counter() - t) * 1e3)
            node.append(_parameters(r.body, r.headers.get("inference-header-content-length"))["total_ms"])
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - wall0
        fronts_cpu = sum(cpu_seconds(f) for f in fronts) - fronts0
    finally:
        client.close()
    rtt, node = rtt[warmup:], node[warmup:]
    _, dtype, shape, out_shape = SHAPES[name]
    return {"requests": n, "input_bytes": element_size(dtype) * math.prod(shape[1:]),
            "output_bytes": element_size("FP16") * math.prod(out_shape[1:]),
            "cpu_ms_per_request": cpu / n * 1e3, "serving_process_busy": cpu / wall,
            "fronts_cpu_ms_per_request": fronts_cpu / n * 1e3,
            "p50_rtt_ms": statistics.median(rtt), "p50_node_ms": statistics.median(node)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--devices", default="", help="cpu, cuda:0, ... (default: every GPU, else cpu)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--fronts", type=int, default=0, help="the node's --fronts (then the serving process is the "
                                                          "controller alone; its fronts' CPU is reported apart)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from swapserve.client import Client
    from swapserve.functions.build import build_bundle
    from swapserve.functions.bundle import pack

    work = Path(tempfile.mkdtemp(prefix="swapserve-serving-cost-"))
    with Server(work / "home", args.devices or "all", pool="1GiB", workspace="512MiB", host_store="2GiB",
                extra=("--fronts", str(args.fronts))) as srv:
        srv.wait_ready()
        client = Client(srv.url, srv.token)
        for name in SHAPES:
            build_bundle(function_dir(work / "fns", name), work / "bundles" / name, progress=lambda line: None)
            client.deploy(pack(work / "bundles" / name))
        gpu = client.status()["devices"][0]["name"]
        shapes = {}
        for name in SHAPES:
            shapes[name] = asyncio.run(measure(srv.url, srv.proc.pid, srv.front_pids(), name, args.requests,
                                                args.warmup))
            print(name, json.dumps({k: round(v, 3) for k, v in shapes[name].items()}), flush=True)
    result = {"gpu": gpu, "date": date.today().isoformat(), "fronts": args.fronts, "shapes": shapes}
    (args.out / "serving_cost.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The serving process's CPU per request — {gpu}, {result['date']}", "",
             f"{args.requests} sequential binary requests per shape over one connection (after {args.warmup}); "
             "CPU = user + system time of the node's serving process (gateway, controller, scheduler), not "
             "its workers" + (f"; with {args.fronts} HTTP fronts that is the controller alone, and the fronts' "
                              "CPU (all of them) is its own column" if args.fronts else "") + ".", "",
             "| shape | in | out | CPU ms / request | fronts' CPU ms / request | p50 round trip ms | p50 node ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in shapes.items():
        lines.append(f"| {name} | {r['input_bytes'] / 1024:.0f} KiB | {r['output_bytes'] / 1024:.0f} KiB | "
                     f"{r['cpu_ms_per_request']:.3f} | {r['fronts_cpu_ms_per_request']:.3f} | {r['p50_rtt_ms']:.3f} "
                     f"| {r['p50_node_ms']:.3f} |")
    (args.out / "serving_cost.md").write_text("\n".join(lines) + "\n")
    from bars import bars

    bars(args.out / "serving_cost.png", f"The serving process's CPU per request — {gpu}",
         [(f"{name} ({r['output_bytes'] / 1024:.0f} KiB out)", r["cpu_ms_per_request"]) for name, r in shapes.items()])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
