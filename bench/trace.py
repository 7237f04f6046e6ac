"""Replay a synthetic serverless trace against a running node; policies side by side; sweep the number
of functions.

* N functions drawn round-robin from the zoo, fp16, one host buffer and device copy each (no sharing);
  per-function mean rates log-normal (median 6 req/min, sigma 1) clipped to [1, 60] req/min; gamma
  inter-arrival times with CV 2 (bursty); a fixed seed; requests over HTTP (binary tensors) from separate
  client processes (``--clients``, 8 by default; functions whose responses exceed 1 MiB — GPT-2's logits —
  over a quarter of them, the others round-robin over the rest), each open-loop: a request leaves at its
  trace time whatever the earlier answers. The first arrival of each function is drawn from its steady
  state (no synchronized burst at t = 0); warm-up and measurement are one continuous replay.
* SLO per function = max(10 ms, 3 × (native_graph_ms + floor_ms)) of its fp16 model on this card, from a
  swap_latency.json of the same card (``--slo-from``) or measured here first.
* Policies: ``swapserve``; ``fifo_lru`` (the pipelined engine with FIFO + LRU instead of the scheduler);
  ``lru_ondemand`` (``.to("cuda")`` from pageable memory on a miss, FIFO, LRU); ``dedicated`` (only the
  functions whose models fit stay resident; the others are refused).
* Each point: fraction of functions whose P98 ≤ SLO (a refused or failed request counts as a miss; functions
  the trace never called are left out and counted), P50/P99 latency, throughput, swaps/s, device busy
  fraction. ``max_functions`` = the largest N with ≥ 98 % of functions within their SLO.
* Answers checked: the client keeps the first values of each answer's first output, and the point counts the
  answers whose values are not their model's (``answers``: the functions of one model share its weights and
  its input, so they answer alike): under load, a run that read another model's pages would show there.

Functions of one architecture share their artifact files on disk (hard links: N × 230 MB of safetensors
would not fit the lent machines' disks) but nothing else: each is its own function with its own host-store
buffer and its own device pages, and swapserve never deduplicates content.

    python bench/trace.py --out bench/results/<gpu>_<yyyymmdd> --sweep 100,200,400 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import lzma
import math
import multiprocessing as mp
import re
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import Server  # noqa: E402
from canary import Canary  # noqa: E402
from steal import StealMeter  # noqa: E402

from swapserve.node.runlog import RUNS_KEPT  # noqa: E402
from swapserve.scheduler.core import SWAP_PIECE_MS  # noqa: E402

POLICIES = {  # name → (scheduler policy, engine mode)
    "swapserve": ("swapserve", "auto"),
    "fifo_lru": ("fifo_lru", "auto"),
    "lru_ondemand": ("fifo_lru", "ondemand"),
    "dedicated": ("dedicated", "auto"),
}
MAX_BATCH = 4
"""Each function's max batch size (its artifact exported with a dynamic batch up to it); every power of two
up to it is a CUDA-graph bucket captured at start (two graphs each), which is most of the node's start."""
HOST_RESERVE_BYTES = 16 << 30
"""Host memory the processes beside the node's host store need (its workers' CUDA contexts and torch, the
controller, the client processes): a point whose host store would leave less of the machine's available memory
is not run."""


@dataclass(frozen=True)
class Fn:
    name: str
    model: str
    slo_ms: float
    rate: float
    """Mean requests per second."""


# --- the trace ----------------------------------------------------------------------------------


def make_functions(n: int, zoo: list[str], slo_ms: dict[str, float], seed: int) -> list[Fn]:
    rng = np.random.default_rng(seed)
    rates = np.clip(rng.lognormal(math.log(6 / 60), 1.0, n), 1 / 60, 1.0)
    return [Fn(f"f{i:04d}-{zoo[i % len(zoo)]}", zoo[i % len(zoo)], slo_ms[zoo[i % len(zoo)]], float(r))
            for i, r in enumerate(rates)]


def make_trace(fns: list[Fn], duration: float, seed: int, cv: float = 2.0) -> list[tuple[float, int]]:
    """(time, function index) sorted by time; gamma inter-arrivals with the given CV per function.

    Each function's stream is observed in its steady state from t = 0: its first arrival is the forward
    recurrence time of the renewal process, U × (a gap drawn length-biased), and a length-biased
    gamma(k, θ) gap is gamma(k + 1, θ). (A random phase into an ordinary gap is not: at CV 2 most gaps
    are tiny, so it put a third of all functions' first requests into the first 0.1 s, a synchronized
    burst no steady trace has.)"""
    rng = np.random.default_rng(seed + 1)
    shape = 1 / cv**2
    events: list[tuple[float, int]] = []
    for i, f in enumerate(fns):
        t = rng.gamma(shape + 1, 1 / (f.rate * shape)) * rng.random()
        while t < duration:
            events.append((float(t), i))
            t += rng.gamma(shape, 1 / (f.rate * shape))
    events.sort()
    return events


# --- the client (its own process) ----------------------------------------------------------------


def _parameters(body: bytes, header_length: str | None) -> dict:
    """The response's ``parameters`` (queue_ms, compute_ms, swapped), for the per-request breakdown."""
    return _answer_head(body, header_length)[0]


HEAD_VALUES = 8
"""Values of each answer's first output the client keeps (the first of its binary data): the answers of one model
are compared with each other (:func:`wrong_answers`), so that a run that read pages not its model's shows."""
_FORMATS = {"FP16": "e", "FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q"}


def _answer_head(body: bytes, header_length: str | None) -> tuple[dict, list[float]]:
    """The response's ``parameters``, and the first :data:`HEAD_VALUES` values of its first output where its
    binary data follows the JSON head in ``body`` (as many as came; none for a JSON-only answer)."""
    n = int(header_length) if header_length else len(body)
    doc = json.loads(body[:n])
    outputs = doc.get("outputs") or []
    fmt = _FORMATS.get(outputs[0].get("datatype", "")) if outputs else None
    values: list[float] = []
    if fmt is not None and header_length:
        size = struct.calcsize(fmt)
        k = min(HEAD_VALUES, (len(body) - n) // size)
        values = [float(v) for v in struct.unpack_from(f"<{k}{fmt}", body, n)]
    return doc.get("parameters") or {}, values


def _refusal(body: bytes) -> tuple[str, float]:
    """A refusal's error message with its numbers blanked, so that refusals of one kind count together, and the
    lateness it expected (its "expected X ms late", the scheduler's finish less the deadline; -1 where it says
    none): whether the node refused requests that would have been late by much, or by a hair."""
    try:
        message = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        message = body[:80].decode(errors="replace")
    late = re.search(r"expected (\d+(?:\.\d+)?) ms late", message)
    return (re.sub(r"\d+(\.\d+)?", "#", re.sub(r"'[^']*'", "'…'", message))[:120],
            float(late.group(1)) if late else -1.0)


def _client(url: str, trace: list[tuple[float, int]], names: list[str], bodies: dict[str, tuple[bytes, int]],
            models: list[str], start_at: float, q: mp.Queue) -> None:
    from http1 import Client  # bench/http1.py: a lean client, so that the load generator does not weigh

    async def main() -> list[tuple]:
        results: list[tuple] = []
        client = Client.of(url)

        async def one(t: float, i: int) -> None:
            body, hlen = bodies[models[i]]
            sent = time.perf_counter()
            headers_ms = -1.0
            try:
                # Of a 200's body only the JSON head and its first output's first values are kept (GPT-2's
                # 12.9 MB of logits are received and counted): the latency runs to the last byte either way.
                r = await asyncio.wait_for(client.request(
                    "POST", f"/v2/models/{names[i]}/infer", body,
                    {"Inference-Header-Content-Length": str(hlen), "Content-Type": "application/octet-stream"},
                    keep_header="inference-header-content-length", keep_more=8 * HEAD_VALUES), timeout=120)
                ms = (time.perf_counter() - sent) * 1e3
                headers_ms = (r.head_at - sent) * 1e3  # the response's head arrived
                status = r.status
                params, head = (_answer_head(r.body, r.headers.get("inference-header-content-length"))
                                if status == 200 else ({}, []))
                reason, late_ms = ("", -1.0) if status == 200 else _refusal(r.body)
            except Exception as e:  # noqa: BLE001 - a failed request is an SLO miss
                status, ms, params, head = 0, (time.perf_counter() - sent) * 1e3, {}, []
                reason, late_ms = type(e).__name__, -1.0
            results.append((i, t, ms, status, params.get("queue_ms", -1.0), params.get("compute_ms", -1.0),
                            bool(params.get("swapped", False)), params.get("server_ms", -1.0),
                            params.get("total_ms", -1.0), headers_ms, reason, params.get("dispatch_ms", -1.0),
                            params.get("worker_ms", -1.0), params.get("lane", -1), params.get("phases_ms", {}),
                            params.get("to_worker_ms", -1.0), params.get("from_worker_ms", -1.0),
                            params.get("expected_ms", -1.0), params.get("answer_ms", -1.0),
                            params.get("budget_ms", -1.0), head, params.get("device", ""),
                            params.get("read_ms", -1.0), params.get("copy_ms", -1.0),
                            params.get("decide_ms", -1.0), late_ms))

        tasks = []
        for t, i in trace:
            delay = start_at + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(t, i)))  # open loop: never wait for earlier answers
        await asyncio.gather(*tasks)
        client.close()
        return results

    try:
        import uvloop

        q.put(uvloop.run(main()))
    except ImportError:
        q.put(asyncio.run(main()))


def median_run(runs: list[dict]) -> dict:
    """One point from replays of it: the run of median attainment (the lower of the middle two), with every
    run's attainment in ``attainment_runs`` (and share of requests in their SLO in ``requests_in_slo_runs``)
    when there was more than one."""
    ranked = sorted(runs, key=lambda r: r["attainment"])
    point = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        point["attainment_runs"] = [r["attainment"] for r in runs]
        point["requests_in_slo_runs"] = [r.get("requests_in_slo") for r in runs]
    return point


def client_of(large: list[bool], clients: int) -> list[int]:
    """The client process of each function. Functions whose responses are large (GPT-2's 12.9 MB of logits)
    get a quarter of the processes to themselves, the rest share the others round-robin: a client's loop
    reading a large body delays every response it is reading meanwhile (on the H200, 34 of 46 late small
    requests overlapped a GPT-2 body read in their own client process, against 6 % of all requests)."""
    k = max(1, clients // 4) if any(large) and clients > 1 else 0
    seen = [0, 0]
    out = []
    for big in large:
        if big and k:
            out.append(seen[1] % k)
        else:
            out.append(k + seen[0] % (clients - k))
        seen[1 if big and k else 0] += 1
    return out


def output_bytes(cache: Path, model: str) -> int:
    """Bytes of one request's outputs (batch 1), from the model's artifact."""
    from swapserve.artifact import load_artifact
    from swapserve.artifact.manifest import dtype_from_name

    total = 0
    for spec in load_artifact(cache / model).manifest.outputs:
        n = dtype_from_name(spec.dtype).itemsize
        for d in spec.shape:
            n *= 1 if d == -1 else d
        total += n
    return total


def request_bodies(models: list[str]) -> dict[str, tuple[bytes, int]]:
    """One binary OIP request body per zoo model (batch 1, fp16 images or int64 tokens)."""
    import torch

    from swapserve.artifact import zoo
    from swapserve.gateway import oip

    out = {}
    for m in models:
        z = zoo.get(m)
        (x,) = z.example(1, torch.float16)
        name = "input_ids" if z.input_kind == "tokens" else "image"
        enc = oip.encode_infer_request({name: x}, binary_inputs=True, binary_outputs=True)
        out[m] = (enc.body, enc.header_length)
    return out


# --- deploying N functions -------------------------------------------------------------------------


def export_models(cache: Path, models: list[str], max_batch: int = MAX_BATCH) -> dict[str, int]:
    """Each zoo model's fp16 artifact in ``cache`` (exported once); returns the bytes of each one's weights."""
    import torch

    from swapserve.artifact import build_artifact, zoo

    for m in sorted(set(models)):
        if not (cache / m / "manifest.json").exists():
            z = zoo.get(m)
            name = "input_ids" if z.input_kind == "tokens" else "image"
            print(f"  exporting {m} (fp16) ...", flush=True)
            build_artifact(z.build(torch.float16), z.example(1, torch.float16), cache / m, name=m,
                           max_batch=max_batch, input_names=[name], output_names=["output"], overwrite=True)
    return {m: (cache / m / "weights.safetensors").stat().st_size for m in models}


def host_store_bytes(model_bytes: int) -> int:
    """The node's host store for ``model_bytes`` of weights: their alignment padding, and a margin."""
    return int(model_bytes * 1.05) + (1 << 30)


def host_room() -> int:
    """Bytes a node's host store can take on this machine: the free space of the shared-memory directory it lives
    in, and the machine's available memory less what the processes beside it need (``HOST_RESERVE_BYTES``)."""
    from swapserve.config import env
    from swapserve.hostmem import available_memory

    shm = env().shm_dir
    shm.mkdir(parents=True, exist_ok=True)
    return min(shutil.disk_usage(shm).free, (available_memory() or 1 << 62) - HOST_RESERVE_BYTES)


def fit_host(sweep: list[int], fns: list[Fn], sizes: dict[str, int], room: int) -> tuple[list[int], dict]:
    """The points of ``sweep`` whose functions' models fit ``room`` bytes of host memory (every model stays in
    page-locked host memory: host memory, not the GPU, bounds N), and what to record of it."""
    need = {n: host_store_bytes(sum(sizes[f.model] for f in fns[:n])) for n in sweep}
    fits = [n for n in sweep if need[n] <= room]
    return fits, {"available_bytes": room, "needed_bytes": {str(n): b for n, b in need.items()},
                  "not_run": [n for n in sweep if n not in fits]}


def build_functions(home: Path, cache: Path, fns: list[Fn], max_batch: int = MAX_BATCH) -> None:
    """Register every function (its model exported by :func:`export_models`) in a fresh registry (the node
    loads them all at start)."""
    from swapserve.artifact import load_artifact
    from swapserve.functions.spec import FunctionSpec
    from swapserve.registry import Registry

    reg = Registry(home)
    try:
        for f in fns:
            art = load_artifact(cache / f.model)
            spec = FunctionSpec.from_dict({
                "name": f.name, "model": {"artifact": "artifact"}, "slo_ms": f.slo_ms, "max_batch": max_batch,
                "late_policy": "refuse", "max_queue": 256,
                "inputs": [{"name": s.name, "datatype": _oip(s.dtype), "shape": list(s.shape)} for s in art.manifest.inputs],
                "outputs": [{"name": s.name, "datatype": _oip(s.dtype), "shape": list(s.shape)} for s in art.manifest.outputs],
            })
            bundle = reg.staging_dir()
            (bundle / "artifact").mkdir(parents=True)
            for file in (cache / f.model).iterdir():
                os.link(file, bundle / "artifact" / file.name)
            import yaml

            (bundle / "function.yaml").write_text(yaml.safe_dump(spec.to_dict()))
            reg.commit(f.name, bundle, spec, art.manifest.nbytes)
    finally:
        reg.close()


def _oip(dtype: str) -> str:
    from swapserve.artifact.manifest import dtype_from_name
    from swapserve.tensors import datatype_of

    return datatype_of(dtype_from_name(dtype))


# --- SLOs ---------------------------------------------------------------------------------------


def slo_table(zoo_names: list[str], source: Path | None) -> tuple[dict[str, float], str]:
    """SLO per model = max(10, 3 × (native_graph_ms + floor_ms)) in fp16 on this card."""
    if source is not None:
        doc = json.loads(source.read_text())
        if "slo_ms" in doc:  # an earlier trace.json of this card: the same table
            missing = [m for m in zoo_names if m not in doc["slo_ms"]]
            if missing:
                raise SystemExit(f"{source} has no SLO for {missing}")
            return {m: doc["slo_ms"][m] for m in zoo_names}, doc.get("slo_source", str(source))
        rows = {r["model"]: r for r in doc["models"] if r.get("dtype") == "float16" and "error" not in r}
        missing = [m for m in zoo_names if m not in rows]
        if missing:
            raise SystemExit(f"{source} has no fp16 rows for {missing}")
        # The floor is that machine's: lent machines of one card differ in their host link (41.9 and 54.6 GB/s
        # in two leases of session 38), so the table says at which bandwidth its floors were measured.
        bw = f" (its floors at pinned H2D {doc['h2d_pinned_GBps']:.1f} GB/s)" if "h2d_pinned_GBps" in doc else ""
        return ({m: max(10.0, 3 * (rows[m]["native_graph_ms"] + rows[m]["floor_ms"])) for m in zoo_names},
                f"{source}{bw}")
    import torch

    from swap_latency import graph_of, h2d_bandwidth, timed
    from swapserve.artifact import zoo

    bw = h2d_bandwidth()
    out = {}
    for m in zoo_names:
        z = zoo.get(m)
        mod = z.build(torch.float16).cuda()
        x = tuple(t.cuda() for t in z.example(1, torch.float16))
        with torch.no_grad():
            g_ms, _ = timed(graph_of(mod, x), 20, 3)
        nbytes = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
        out[m] = max(10.0, 3 * (g_ms + nbytes / (bw * 1e9) * 1e3))
        del mod
        torch.cuda.empty_cache()
    return out, f"measured here (pinned H2D {bw:.1f} GB/s)"


# --- one point ----------------------------------------------------------------------------------


def p98(xs: list[float]) -> float:
    """The 98th percentile, nearest rank (misses are +inf, so interpolation would be meaningless)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(0.98 * len(xs)) - 1)]


def lane_runs(srv: Server, since: float) -> tuple[list[dict], list[dict]]:
    """What the node's lanes ran (``GET /api/v1/runs``: runs, pieces of swaps, prefetches) since ``since`` on
    this process's ``time.perf_counter()``, each a dict of the log's fields with ``begun`` and ``ended`` moved to
    that clock; and the controller's stalls since then, the same way (none from a node before session 31). The
    node's clock is mapped by the answer's ``now`` against the middle of the request (within half its round
    trip; on Linux both are the same monotonic clock anyway)."""
    def get(path: str) -> dict:
        ask = urllib.request.Request(f"{srv.url}{path}", headers={"Authorization": f"Bearer {srv.token}"})
        with urllib.request.urlopen(ask, timeout=30) as r:
            return json.loads(r.read())

    before = time.perf_counter()
    now = get("/api/v1/runs?limit=1")["now"]  # its clock (and one run at most)
    offset = now - (before + time.perf_counter()) / 2
    log = get(f"/api/v1/runs?since={since + offset!r}&limit={RUNS_KEPT}")
    runs = [dict(zip(log["fields"], r)) for r in log["runs"]]
    stalls = [dict(zip(log["stall_fields"], x)) for x in log.get("stalls", ())]
    for r in runs + stalls:
        r["begun"] -= offset
        r["ended"] -= offset
    return runs, stalls


def scrape(url: str) -> dict[str, float]:
    families = ("swapserve_swap_seconds", "swapserve_compute_seconds", "swapserve_event_loop_lag_seconds",
                "swapserve_front_event_loop_lag_seconds", "swapserve_peer_copies", "swapserve_placed_ahead",
                "swapserve_remaps", "swapserve_remap_unmaps")
    query = "&".join(f"name[]={f}" for f in families)  # only these: a cheap scrape, mid-trace
    text = urllib.request.urlopen(f"{url}/metrics?{query}", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("swapserve_swap_seconds_count", "swapserve_compute_seconds_sum",
                            "swapserve_peer_copies_total", "swapserve_placed_ahead_total", "swapserve_remaps_total",
                            "swapserve_remap_unmaps_total")):
            key = line.split("{")[0]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(("swapserve_event_loop_lag_seconds", "swapserve_front_event_loop_lag_seconds")):
            # _count, _sum, _bucket{le="..."}
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def loop_lag(before: dict[str, float], after: dict[str, float],
             name: str = "swapserve_event_loop_lag_seconds") -> dict[str, float] | None:
    """The node's event-loop lag over a point (``name``: the controller's, or its HTTP fronts'): probe ticks
    (every 10 ms), how many ran over 2.5 and 10 ms late, and the mean lateness."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith(name + "_")}
    ticks = d.get(f"{name}_count", 0.0)
    if not ticks:
        return None
    return {"ticks": ticks, "over_2.5ms": ticks - d.get(f'{name}_bucket{{le="0.0025"}}', ticks),
            "over_10ms": ticks - d.get(f'{name}_bucket{{le="0.01"}}', ticks),
            "mean_ms": d.get(f"{name}_sum", 0.0) / ticks * 1e3}


def start_profiles(srv: Server, prefix: Path, seconds: float) -> list[tuple[subprocess.Popen, Path]]:
    """py-spy (where installed: on the PATH, or beside this interpreter, as in a virtual environment not
    activated) sampling the controller and each HTTP front for ``seconds``, without pausing them, into
    ``PREFIX_controller.txt``, ``PREFIX_front<i>.txt`` (raw stacks)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("trace: --profile needs py-spy (pip install py-spy); not profiling", flush=True)
        return []
    prefix.parent.mkdir(parents=True, exist_ok=True)
    targets = [("controller", srv.proc.pid)] + [(f"front{i}", pid) for i, pid in enumerate(srv.front_pids())]
    spies = []
    for name, pid in targets:
        out = prefix.parent / f"{prefix.name}_{name}.txt"
        cmd = [spy, "record", "--nonblocking", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "-f", "raw",
               "-o", str(out)]
        spies.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
    return spies


def finish_profiles(spies: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for the samplers and write each profile's summary beside it (bench/profile_summary.py)."""
    from profile_summary import summarize

    for proc, out in spies:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if out.exists():
            out.with_suffix(".md").write_text(summarize(out))


NODE_OPTIONS = ("duration_s", "max_batch", "client_processes", "lanes", "swap_piece_ms", "queue_ahead", "side_fetch",
                "peer_copies", "place_ahead", "gateway_margin", "slo_values", "fronts", "gpus", "spin_ms")
"""What each policy's entry in trace.json records of how its node and trace ran."""

def model_of(function: str) -> str:
    """The zoo model a trace's function serves (``f0012-resnet50`` → ``resnet50``; :func:`make_functions`)."""
    return function.split("-", 1)[1]


RAW_SUFFIX = ".jsonl.xz"
"""Raw records: one JSON object a line, xz-compressed (a fifth smaller than gzip; since 2026-11-30's twenty-ninth
session, when the committed ones were recompressed to keep the working tree under the lent GPUs' 64 MiB). Files
written before as ``.jsonl.gz`` are read alike."""
RAW_SUFFIXES = (RAW_SUFFIX, ".jsonl.gz")


RUNS_DIR = "runs"
"""Under a trace's ``trace_raw/``: per replay, what the node's lanes ran during its measurement (:func:`lane_runs`),
one JSON object a line, with ``begun_s`` and ``ended_s`` on the records' clock (``at_s``)."""
STALLS_DIR = "stalls"
"""The same for the controller's stalls (turns of its event loop and collections of 1 ms or more)."""


def read_runs(directory: Path, tag: str, kind: str = RUNS_DIR) -> list[dict] | None:
    """What the lanes ran in replay ``tag`` of ``directory`` (None: not recorded, as before session 30); with
    ``kind`` :data:`STALLS_DIR`, the controller's stalls (None before session 31)."""
    for f in sorted((directory / "trace_raw" / kind).glob("*.jsonl.*")):
        if f.name.endswith(RAW_SUFFIXES) and raw_tag(f.name) == tag:
            return read_records(f)
    return None


def raw_files(directory: Path) -> list[Path]:
    """The raw record files in ``directory/trace_raw``, by name."""
    return sorted((f for f in (directory / "trace_raw").glob("*.jsonl.*") if f.name.endswith(RAW_SUFFIXES)),
                  key=lambda f: f.name)


def raw_tag(name: str) -> str:
    """A raw file's replay: its name less the suffix (``swapserve_800``, ``swapserve_400_r1``)."""
    return next((name.removesuffix(x) for x in RAW_SUFFIXES if name.endswith(x)), name)


def open_raw(path: Path, mode: str = "rt") -> IO[str]:
    """A raw record file, xz or gzip by its suffix."""
    return gzip.open(path, mode) if path.name.endswith(".gz") else lzma.open(path, mode)


def read_records(path: Path) -> list[dict]:
    """One raw record file's records, in send order (as :func:`run_point` writes them)."""
    with open_raw(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_raw(directory: Path) -> dict[str, list[dict]]:
    """Each replay's records in ``directory/trace_raw`` (``--raw``), by replay (:func:`raw_tag`: one replay's
    records match across codes, whichever compression wrote them), in send order."""
    return {raw_tag(f.name): read_records(f) for f in raw_files(directory)}


RAW_FIELDS = ("function", "at_s", "latency_ms", "status", "queue_ms", "compute_ms", "swapped", "server_ms", "node_ms",
              "headers_ms", "reason", "dispatch_ms", "worker_ms", "lane", "phases_ms", "to_worker_ms", "from_worker_ms",
              "expected_ms", "answer_ms", "budget_ms", "head", "device", "read_ms", "copy_ms", "decide_ms", "late_ms")


def run_point(srv: Server, fns: list[Fn], duration: float, warmup: float, seed: int,
              bodies: dict[str, tuple[bytes, int]], raw: Path | None = None, clients: int = 8,
              large: frozenset[str] = frozenset(), profile: Path | None = None) -> dict:
    names, models = [f.name for f in fns], [f.model for f in fns]
    ctx = mp.get_context("spawn")

    # One trace of warm-up then measurement, replayed without a break (the node goes from one straight into
    # the other, as a live one would); only requests sent after the warm-up count, and the node's counters
    # are read at that moment and at the end.
    trace = make_trace(fns, warmup + duration, seed)
    q: mp.Queue = ctx.Queue()
    start_at = time.perf_counter() + 2.0  # the client processes start meanwhile (one monotonic clock)
    owner = client_of([f.model in large for f in fns], clients)
    parts = [[(t, i) for t, i in trace if owner[i] == k] for k in range(clients)]
    procs = [ctx.Process(target=_client, args=(srv.url, part, names, bodies, models, start_at, q)) for part in parts]
    steal, canary = StealMeter(), Canary()
    canary.start()  # a process: started with the clients, before the trace, not at the measurement's start
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at + warmup - time.perf_counter()))
    before, t0 = scrape(srv.url), time.time()
    steal.start()
    canary.mark()
    spies = start_profiles(srv, profile, duration) if profile is not None else []
    res = [r for _ in procs for r in q.get(timeout=duration + warmup + 600)]
    after, elapsed = scrape(srv.url), time.time() - t0
    cpu_steal, cpu_canary = steal.stop(), canary.stop()
    finish_profiles(spies)
    for p in procs:
        p.join()
    res = [(r[0], r[1] - warmup, *r[2:]) for r in res if r[1] >= warmup]
    records = [dict(zip(RAW_FIELDS, (fns[r[0]].name, *r[1:]))) for r in sorted(res, key=lambda r: r[1])]
    if raw is not None:  # every request, one JSON object a line (for looking into tails)
        raw.parent.mkdir(parents=True, exist_ok=True)
        with open_raw(raw, "wt") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        # And what the lanes ran meanwhile, pieces of swaps and prefetches too, and the controller's stalls, on the
        # records' clock (at_s).
        zero = start_at + warmup
        try:
            runs, stalls = lane_runs(srv, zero)
        except (OSError, ValueError, KeyError) as e:  # the requests' records stand without it
            print(f"  the node's run log could not be read: {e}", file=sys.stderr)
        else:
            for kind, entries in ((RUNS_DIR, runs), (STALLS_DIR, stalls)):
                (raw.parent / kind).mkdir(exist_ok=True)
                with open_raw(raw.parent / kind / raw.name, "wt") as f:
                    for e in entries:
                        e["begun_s"], e["ended_s"] = e.pop("begun") - zero, e.pop("ended") - zero
                        f.write(json.dumps(e) + "\n")
    lat: dict[int, list[float]] = {}
    for i, _, ms, code, *_ in res:
        lat.setdefault(i, []).append(ms if code == 200 else math.inf)
    ok = [ms for _, _, ms, code, *_ in res if code == 200]
    done = [r for r in res if r[3] == 200]
    misses = [r for r in done if r[2] > fns[r[0]].slo_ms]
    attained = sum(1 for i, xs in lat.items() if p98(xs) <= fns[i].slo_ms)
    in_slo = sum(1 for i, _, ms, code, *_ in res if code == 200 and ms <= fns[i].slo_ms)
    swaps = after.get("swapserve_swap_seconds_count", 0) - before.get("swapserve_swap_seconds_count", 0)
    busy = after.get("swapserve_compute_seconds_sum", 0) - before.get("swapserve_compute_seconds_sum", 0)
    codes: dict[str, int] = {}
    for r in res:
        codes[str(r[3])] = codes.get(str(r[3]), 0) + 1
    return {
        "n": len(fns),
        "measured_from": t0,  # wall clock (s since the epoch) of the measurement's start: records' at_s 0
        "attainment": attained / max(1, len(lat)),
        # Requests answered within their function's SLO, of all sent: with a few requests per function (N=400,
        # 20 s: ~2 each), a function's P98 is its worst request, and attainment moves by whole functions.
        "requests_in_slo": in_slo / max(1, len(res)),
        "functions_called": len(lat),
        "requests": len(res),
        "completed": len(ok),
        "status_codes": codes,
        "p50_ms": float(np.percentile(ok, 50)) if ok else None,
        "p99_ms": float(np.percentile(ok, 99)) if ok else None,
        "throughput_rps": len(ok) / duration,
        "swaps_per_s": swaps / elapsed,
        "peer_copies_per_s": (after.get("swapserve_peer_copies_total", 0)
                              - before.get("swapserve_peer_copies_total", 0)) / elapsed,
        "placed_ahead_per_s": (after.get("swapserve_placed_ahead_total", 0)
                               - before.get("swapserve_placed_ahead_total", 0)) / elapsed,
        # Slots the swaps mapped onto other pages, and of them those that unmapped a page first (driver calls).
        "remaps_per_swap": (after.get("swapserve_remaps_total", 0) - before.get("swapserve_remaps_total", 0))
                           / max(1, swaps),
        "remap_unmaps_per_swap": (after.get("swapserve_remap_unmaps_total", 0)
                                  - before.get("swapserve_remap_unmaps_total", 0)) / max(1, swaps),
        "loop_lag": loop_lag(before, after),
        "front_loop_lag": loop_lag(before, after, "swapserve_front_event_loop_lag_seconds"),
        "cpu_steal": cpu_steal,  # the machine's CPU time the hypervisor took meanwhile (bench/steal.py)
        "cpu_canary": cpu_canary,  # how fast the machine ran a fixed piece of Python meanwhile (bench/canary.py)
        "busy_fraction": busy / elapsed / srv_devices(srv),
        "latencies_ms": sorted(ok)[:: max(1, len(ok) // 2000)],  # a thinned sample for the CDF plot
        "swapped_fraction": sum(r[6] for r in done) / max(1, len(done)),
        "side_lane_fraction": sum(r[13] >= 1 for r in done) / max(1, len(done)),  # any side lane
        "p50_queue_ms": float(np.median([r[4] for r in done])) if done else None,
        "p50_compute_ms": float(np.median([r[5] for r in done])) if done else None,
        "longest_run_ms": max((r[5] for r in done), default=None),  # a stall of the GPU or a worker shows here
        "late_completions": len(misses),
        "p50_server_ms": float(np.median([r[7] for r in done])) if done else None,
        "refusals": dict(Counter(r[10] for r in res if r[3] != 200).most_common(8)),
        # The lateness each refusal expected (ms), where its message said: refusals by a hair cost attainment
        # that serving them might have kept; refusals by much spared the queue behind them.
        "refused_late_ms": sorted(r["late_ms"] for r in records if r["status"] != 200 and r["late_ms"] >= 0),
        "late_breakdown": breakdown(misses),  # where the time of completed-but-late requests went
        "breakdown_by_model": {m: breakdown([r for r in done if fns[r[0]].model == m])
                               for m in sorted({f.model for f in fns})},
        "misses_by_model": {m: sum(1 for i, xs in lat.items() if fns[i].model == m and p98(xs) > fns[i].slo_ms)
                            for m in sorted({f.model for f in fns})},
        "phases_by_model": {m: {kind: phases([r for r in done if fns[r[0]].model == m and r[6] == swapped])
                                for kind, swapped in (("resident", False), ("swapped", True))}
                            for m in sorted({f.model for f in fns})},
        "miss_causes": miss_causes(records, {f.name: f.slo_ms for f in fns}),
        "by_device": by_device(records),
        "answers": wrong_answers(records),
    }


def request_parts(r: dict) -> dict[str, float]:
    """Where a completed request's time went (ms, from its raw record): ``client`` = client latency − the gateway
    handler's time − ``read`` (HTTP both ways, the client's writing and reading); ``read`` = the serving process's
    reading of the request, from its first bytes until the handler runs (records since session 23; before, part of
    ``client``); ``gateway`` = handler − node; ``queue`` in the controller; ``dispatch`` = the decision to its
    message sent (with the inputs written); ``pipes`` = the message's way to the worker and the reply's back, each
    until the other end's loop or thread took it up; ``controller`` = the rest of node − worker (admission, the
    reply's handling); ``lane`` in the worker, behind a run queued ahead of it (:func:`lane_ms`); ``place``
    (pinning, evictions, remaps in the worker); ``swap`` = the device phase of a swapped run. Records from before
    the pipes were timed (2026-11-28's ninth session) count dispatch and pipes under controller."""
    ph = r.get("phases_ms") or {}
    timed = r.get("to_worker_ms", -1.0) >= 0 and r.get("from_worker_ms", -1.0) >= 0
    dispatch = r["dispatch_ms"] if timed else 0.0
    pipes = r["to_worker_ms"] + r["from_worker_ms"] if timed else 0.0
    read = max(0.0, r.get("read_ms", -1.0))
    return {"client": r["latency_ms"] - r["server_ms"] - read, "read": read, "gateway": r["server_ms"] - r["node_ms"],
            "controller": r["node_ms"] - r["worker_ms"] - r["queue_ms"] - dispatch - pipes, "queue": r["queue_ms"],
            "dispatch": dispatch, "pipes": pipes, "lane": lane_ms(r),
            "place": ph.get("place", 0.0), "swap": ph.get("device", 0.0) if r["swapped"] else 0.0}


def lane_ms(r: dict) -> float:
    """What of a completed request's time in the worker its run's phases do not cover: its wait in the lane's
    queue, behind a run sent ahead of it (~0.1–0.3 ms of bookkeeping otherwise)."""
    ph = r.get("phases_ms") or {}
    if not ph or r.get("worker_ms", -1.0) < 0:
        return 0.0
    return max(0.0, r["worker_ms"] - sum(ph.get(k, 0.0) for k in PHASES))


def queued_ms(r: dict) -> float:
    """A completed request's waiting for its turn (ms): in the controller's queue and in the worker's lane."""
    return r["queue_ms"] + lane_ms(r)


def latency_or_inf(r: dict) -> float:
    """A request's latency, +inf for a refused or failed one (a miss whatever its SLO)."""
    return r["latency_ms"] if r["status"] == 200 else math.inf


def worst_requests(by_fn: dict[str, list[dict]], slo_ms: dict[str, float]) -> dict[str, dict]:
    """Each function whose P98 is over its SLO (``slo_ms`` by function name), with its worst request."""
    return {fn: max(rs, key=latency_or_inf) for fn, rs in by_fn.items()
            if p98([latency_or_inf(r) for r in rs]) > slo_ms[fn]}


def worst_part(r: dict) -> str:
    """The largest part of a request's time (:func:`request_parts`), or ``refused`` for a refused or failed one."""
    if r["status"] != 200:
        return "refused"
    parts = request_parts(r)
    return max(parts, key=parts.__getitem__)


def miss_causes(records: list[dict], slo_ms: dict[str, float]) -> dict:
    """For each function whose P98 is over its SLO (``slo_ms`` by function name), the largest part of its
    worst request (``refused`` for a refused or failed one); and the attainment with every request's
    queueing removed, a bound on what the order of service alone could win."""
    by_fn: dict[str, list[dict]] = {}
    for r in records:
        by_fn.setdefault(r["function"], []).append(r)
    met_no_queue = sum(p98([r["latency_ms"] - queued_ms(r) if r["status"] == 200 else math.inf for r in rs])
                       <= slo_ms[fn] for fn, rs in by_fn.items())
    causes = Counter(worst_part(r) for r in worst_requests(by_fn, slo_ms).values())
    return {"missed": sum(causes.values()), "worst_part": dict(causes.most_common()),
            "attainment_without_queueing": met_no_queue / max(1, len(by_fn)),
            "followers": burst_followers(by_fn, slo_ms)}


def by_device(records: list[dict]) -> dict[str, dict]:
    """Where answered requests ran, by device: how many, how many of them swapped, their runs' seconds (swap and
    execution), and the 90th percentile of their time queued in the controller — on two H200s the first device
    took 2.5-6 times the second's swaps (session 25), which the totals hide."""
    ran: dict[str, list[dict]] = {}
    for r in records:
        if r["status"] == 200 and r.get("device"):
            ran.setdefault(r["device"], []).append(r)
    return {device: {"requests": len(rs), "swapped": sum(bool(r["swapped"]) for r in rs),
                     "compute_s": sum(r["compute_ms"] for r in rs) / 1e3,
                     "p90_queue_ms": float(np.percentile([r["queue_ms"] for r in rs], 90))}
            for device, rs in sorted(ran.items())}


FOLLOWER_MS = 10.0
"""A request arriving this soon after the one before it of its function is a burst's follower."""


WRONG_TOLERANCE = 0.02
"""How far an answer's first values may lie from its model's reference, relative to the reference's largest
magnitude (plus one): runs at different batch sizes sum in other orders (fp16: ~1e-3), while weights read from
another model's pages give other numbers altogether."""


def wrong_answers(records: list[dict]) -> dict:
    """Answers whose first values (``head``) are not their model's: the functions of one model share its weights
    and the trace sends each model one input, so every answer of a model should carry the same numbers up to
    the summing order of its batch size. The reference is the element-wise median over the model's answers (NaN
    left out); an answer further than :data:`WRONG_TOLERANCE` from it (or not finite) is wrong. Records without
    values (failed, or from runs before the client kept them) are left out."""
    by_model: dict[str, list[list[float]]] = {}
    for r in records:
        if r["status"] == 200 and r.get("head"):
            by_model.setdefault(model_of(r["function"]), []).append(r["head"])
    wrong: dict[str, int] = {}
    checked = 0
    for model, heads in by_model.items():
        k = min(len(h) for h in heads)
        values = np.array([h[:k] for h in heads], dtype=np.float64)
        ref = np.nanmedian(values, axis=0)  # a NaN answer does not move it
        limit = WRONG_TOLERANCE * (1.0 + float(np.max(np.abs(ref)))) if np.all(np.isfinite(ref)) else 0.0
        off = ~(np.abs(values - ref) <= limit).all(axis=1)  # NaN compares false: counted wrong
        checked += len(heads)
        if off.any():
            wrong[model] = int(off.sum())
    return {"checked": checked, "wrong": sum(wrong.values()), "by_model": wrong}


def burst_followers(by_fn: dict[str, list[dict]], slo_ms: dict[str, float]) -> dict[str, int]:
    """Requests that came within :data:`FOLLOWER_MS` of the one before of their function (at CV 2 one in seven
    does): how many, how many shared that one's run (a batch: the same run time in the same lane), and of
    the others how many were late or refused, against all late or refused requests. A follower run on its
    own waits for its leader's swap or run."""
    n = batched = late_alone = late = 0
    for fn, rs in by_fn.items():
        prev = None
        for r in sorted(rs, key=lambda r: r.get("at_s", 0.0)):
            bad = r["status"] != 200 or r["latency_ms"] > slo_ms[fn]
            late += bad
            if prev is not None and "at_s" in r and (r["at_s"] - prev["at_s"]) * 1e3 < FOLLOWER_MS:
                n += 1
                if r["status"] == prev["status"] == 200 and (r.get("compute_ms"), r.get("lane")) == (
                        prev.get("compute_ms"), prev.get("lane")):
                    batched += 1
                else:
                    late_alone += bad
            prev = r
    return {"requests": n, "batched": batched, "late_alone": late_alone, "late": late}


def breakdown(rows: list[tuple]) -> dict | None:
    """Medians of where completed requests' time went: the client's whole latency, its response head,
    the gateway's handler (``server_ms``), the node (``node_ms``: admission to answer), the queue, the
    dispatch (decision to message sent) and of it the scheduling pass's decision, the message's way to the
    worker, the worker (message to reply), the reply's way back and the run (swap + execution);
    with the fraction swapped."""
    if not rows:
        return None
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    return {"requests": len(rows), "latency_ms": med(2), "headers_ms": med(9), "server_ms": med(7),
            "node_ms": med(8), "queue_ms": med(4), "dispatch_ms": med(11), "decide_ms": med(24),
            "to_worker_ms": med(15), "worker_ms": med(12), "from_worker_ms": med(16), "compute_ms": med(5),
            "swapped_fraction": sum(r[6] for r in rows) / len(rows)}


PHASES = ("wait", "upload", "place", "device", "output")
PLACE_PARTS = ("place_lock", "place_remap", "place_remap_cpu")
"""Parts of ``place`` (runs since 2026-11-28's fourth session report them; the remaps' CPU time since the
fifth)."""


def phases(rows: list[tuple]) -> dict | None:
    """Medians of where the worker's runs went (``phases_ms`` of each response: waiting for the lane or a
    capture, putting inputs up, pinning and pages, the device, writing outputs)."""
    with_phases = [r[14] for r in rows if r[14]]
    if not with_phases:
        return None
    return {"runs": len(with_phases),
            **{k: float(np.median([p.get(k, 0.0) for p in with_phases])) for k in PHASES + PLACE_PARTS}}


def srv_devices(srv: Server) -> int:
    from swapserve.client import Client

    return max(1, len(Client(srv.url, srv.token).status()["devices"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", default="50,100,200,400", help="numbers of functions, ascending")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of measured trace per point")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of unmeasured trace before each point")
    ap.add_argument("--devices", default="", help="default: every GPU")
    ap.add_argument("--pool", default="16GiB", help="weight pool per GPU (the benchmark's cap)")
    ap.add_argument("--zoo", default="resnet50,resnet152,densenet201,inception_v3,efficientnet_b0,vit_b_16,vgg19,"
                                     "bert-base,bert-large,gpt2-medium")
    ap.add_argument("--slo-from", type=Path, help="swap_latency.json of this card (fp16 rows), or a trace.json "
                                                   "of this card (its SLO table)")
    ap.add_argument("--slo-ms", type=float, help="one SLO for every function instead (smoke runs on a CPU only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=8, help="client processes (functions spread over them; those "
                                                            "with large responses over a quarter of their own)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--raw", action="store_true", help="also write every request of each point to "
                                                        f"OUT/trace_raw/<policy>_<N>{RAW_SUFFIX}")
    ap.add_argument("--no-prepare", action="store_true", help="capture graphs on first use, not at start")
    ap.add_argument("--lanes", type=int, choices=range(1, 5), metavar="K",
                    help="runs in flight per GPU, 1 to 4 (serve --lanes; default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="replays of each point on the same node; the point "
                    "is the run of median attainment, every run's attainment listed (the spread: with a few "
                    "requests per function, P98 is the worst one)")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH, help="each function's max batch size; 1 captures "
                    "a third of the graphs at start (development runs: a shorter node start, less batching)")
    ap.add_argument("--swap-piece-ms", type=float, help="serve --swap-piece-ms (default: the node's own; 0: off)")
    ap.add_argument("--queue-ahead", action=argparse.BooleanOptionalAction, default=True,
                    help="serve --queue-ahead / --no-queue-ahead (default: on, the node's default)")
    ap.add_argument("--side-fetch", action=argparse.BooleanOptionalAction, default=True,
                    help="serve --side-fetch / --no-side-fetch (default: on, the node's default)")
    ap.add_argument("--place-ahead", action=argparse.BooleanOptionalAction, default=True,
                    help="serve --place-ahead / --no-place-ahead (default: on, the node's default)")
    ap.add_argument("--gateway-margin", action=argparse.BooleanOptionalAction, default=True,
                    help="serve --gateway-margin / --no-gateway-margin (default: on, the node's default)")
    ap.add_argument("--peer-copies", action=argparse.BooleanOptionalAction, default=None,
                    help="serve --peer-copies / --no-peer-copies (default: the node's: on for several GPUs)")
    ap.add_argument("--slo-values", action=argparse.BooleanOptionalAction, default=False,
                    help="serve --slo-values / --no-slo-values (default: off, the node's default)")
    ap.add_argument("--profile", action="store_true", help="sample the controller and each HTTP front with py-spy "
                                                            "through each measured point (OUT/profiles/, with a "
                                                            "summary of each)")
    ap.add_argument("--fronts", type=int, default=0, help="serve --fronts: HTTP front processes (default 0: the "
                                                          "controller serves HTTP itself)")
    ap.add_argument("--alternate", metavar="SETTING=A,B",
                    help="an A/B on one node: replays alternate a scheduling setting the running node changes "
                         "(PATCH /api/v1/scheduling), e.g. side_fetch=true,false or swap_piece_ms=3,0; each value's "
                         "runs are a trace of their own, in OUT/SETTING_VALUE/ (give --repeats a multiple), each "
                         "round of replays in the order of the round before reversed (A B, B A, A B, ..., from "
                         "point to point too); with --raw, OUT/paired.md compares them request by request "
                         "(bench/paired.py)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = [int(x) for x in args.sweep.split(",")]
    zoo_names = args.zoo.split(",")
    if args.slo_ms is not None:
        slo, slo_source = {m: args.slo_ms for m in zoo_names}, f"fixed at {args.slo_ms} ms (--slo-ms)"
    else:
        slo, slo_source = slo_table(zoo_names, args.slo_from)
    print("SLOs (ms):", {m: round(v, 1) for m, v in slo.items()}, flush=True)
    fns = make_functions(max(sweep), zoo_names, slo, args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="swapserve-trace-"))
    cache = work / "artifacts" / f"batch{args.max_batch}"
    sizes = export_models(cache, zoo_names, args.max_batch)
    sweep, host_memory = fit_host(sweep, fns, sizes, host_room())
    for n in host_memory["not_run"]:
        print(f"N={n} not run: its models need a host store of {host_memory['needed_bytes'][str(n)] / 1e9:.1f} GB, "
              f"this machine has room for {host_memory['available_bytes'] / 1e9:.1f} GB (host memory bounds N here)",
              flush=True)
    if not sweep:
        raise SystemExit("no point of the sweep fits this machine's host memory")
    fns = fns[:max(sweep)]
    bodies = request_bodies(sorted(set(zoo_names)))
    header = {"date": date.today().isoformat(), "slo_ms": slo, "slo_source": slo_source,
              "duration_s": args.duration, "seed": args.seed, "zoo": zoo_names, "max_batch": args.max_batch,
              "client_processes": args.clients, "lanes": args.lanes or 2,
              "swap_piece_ms": args.swap_piece_ms if args.swap_piece_ms is not None else SWAP_PIECE_MS,
              "queue_ahead": args.queue_ahead, "side_fetch": args.side_fetch, "peer_copies": args.peer_copies,
              "place_ahead": args.place_ahead, "gateway_margin": args.gateway_margin,
              "slo_values": args.slo_values, "fronts": args.fronts, "host_memory": host_memory}
    variants = alternates(args.alternate, args.out)  # (directory, settings): the runs of each go there
    results = []
    for out, settings in variants:
        out.mkdir(parents=True, exist_ok=True)
        r = json.loads((out / "trace.json").read_text()) if (out / "trace.json").exists() else {"policies": {}}
        results.append({**r, **header, **settings})
    host_store = host_store_bytes(sum(sizes[f.model] for f in fns))
    large = frozenset(m for m in zoo_names if output_bytes(cache, m) > 1 << 20)
    for result in results:
        result["large_output_models"] = sorted(large)
    for label in args.policies.split(","):
        policy, mode = POLICIES[label]
        home = work / f"home-{label}"
        shutil.rmtree(home, ignore_errors=True)
        print(f"[{label}] registering {len(fns)} functions ...", flush=True)
        build_functions(home, cache, fns, args.max_batch)
        extra = (("--policy", policy, "--mode", mode) + (("--no-prepare",) if args.no_prepare else ())
                 + (("--lanes", str(args.lanes)) if args.lanes else ())
                 + (("--swap-piece-ms", str(args.swap_piece_ms)) if args.swap_piece_ms is not None else ())
                 + ("--queue-ahead" if args.queue_ahead else "--no-queue-ahead",)
                 + ("--side-fetch" if args.side_fetch else "--no-side-fetch",)
                 + (() if args.peer_copies is None else ("--peer-copies" if args.peer_copies else "--no-peer-copies",))
                 + ("--place-ahead" if args.place_ahead else "--no-place-ahead",)
                 + ("--gateway-margin" if args.gateway_margin else "--no-gateway-margin",)
                 + ("--slo-values" if args.slo_values else "--no-slo-values",)
                 + ("--fronts", str(args.fronts)))
        srv = Server(home, args.devices or "all", pool=args.pool, host_store=str(host_store),
                     workspace="2GiB", extra=extra)
        try:
            t0 = time.time()
            srv.wait_ready()
            print(f"[{label}] node ready in {time.time() - t0:.0f} s", flush=True)
            from swapserve.client import Client

            client = Client(srv.url, srv.token)
            st = client.status()
            for result in results:
                result["gpu"] = st["devices"][0]["name"]
                result["gpus"] = len(st["devices"])
                scheduling = client.scheduling()
                result["spin_ms"] = scheduling["spin_ms"]  # its default depends on the machine
                if result.get("peer_copies") is None:  # the node's default: on for several GPUs
                    result["peer_copies"] = scheduling["peer_copies"]
                # The node's link profile, measured at its start: host→GPU GB/s with all GPUs copying at once,
                # and the slowdown of execution under a copy (what the scheduler counts as contention).
                result["link_profile"] = {k: v for k, v in (st.get("extra") or {}).items()
                                          if not k.startswith("busy_")}
            points: list[list[dict]] = [[] for _ in variants]
            for i, n in enumerate(sweep):
                runs: list[list[dict]] = [[] for _ in variants]
                for k in range(args.repeats):
                    # The alternation goes on from point to point: with two replays a point, A B, then B A, ...
                    v = variant_of(i * args.repeats + k, len(variants))
                    out, settings = variants[v]
                    if settings and any(client.configure_scheduling(**settings).get(key) != value
                                        for key, value in settings.items()):
                        raise SystemExit(f"the node did not take {settings}")
                    tag = f"{label}_{n}" + (f"_r{k // len(variants)}" if args.repeats > len(variants) else "")
                    raw = out / "trace_raw" / f"{tag}{RAW_SUFFIX}" if args.raw else None
                    runs[v].append(run_point(srv, fns[:n], args.duration, args.warmup, args.seed, bodies, raw,
                                             args.clients, large, out / "profiles" / tag if args.profile else None))
                    # What the node has learned by the run's end (the slowdown of runs side by side).
                    runs[v][-1]["link_profile_after"] = {k: x for k, x in (client.status().get("extra") or {}).items()
                                                         if k.startswith("exec_slowdown")}
                    # Written after every replay, not once a point's replays are done: a run cut short (a lease's
                    # time running out) keeps what it measured.
                    keep(variants[v], results[v], label, policy, mode, [*points[v], median_run(runs[v])])
                for (_, settings), vruns, vpoints in zip(variants, runs, points):
                    if not vruns:
                        continue
                    pt = median_run(vruns)
                    vpoints.append(pt)
                    print(f"[{label}]{''.join(f' {k}={v}' for k, v in settings.items())} N={n}: attainment "
                          f"{pt['attainment']:.3f}, p50 {pt['p50_ms']} ms, p99 {pt['p99_ms']} ms, "
                          f"{pt['throughput_rps']:.1f} req/s, {pt['swaps_per_s']:.1f} swaps/s, busy "
                          f"{pt['busy_fraction']:.2f}, codes {pt['status_codes']}", flush=True)
        finally:
            stopped = time.time()
            print(f"[{label}] server exit {srv.stop()} after {time.time() - stopped:.1f} s", flush=True)
            # The node's own log (start-up progress, warnings, its stop) goes with the results: home is deleted.
            shutil.copyfile(home / "serve.log", args.out / f"serve_{label}.log")
        shutil.rmtree(home, ignore_errors=True)
    from report_trace import render

    for (out, _), result in zip(variants, results):
        render(result, out)
    if args.raw and len(variants) > 1:
        print(paired_report(args.alternate, [out for out, _ in variants], args.out))


def paired_report(setting: str, dirs: list[Path], out: Path) -> str:
    """An A/B alternating on one node, request by request (``bench/paired.py``): the first value's replays
    against each other's, written to ``out/paired.md``; replay ``r<i>`` of each value ran one after the other
    (in round i's order, :func:`variant_of`)."""
    from paired import compare, table

    a, *others = dirs
    text = f"# {setting}: request by request\n\n" + "\n\n".join(table(a, b, compare(a, b, set())) for b in others)
    (out / "paired.md").write_text(text + "\n")
    return text


def variant_of(k: int, variants: int) -> int:
    """Which variant replay ``k`` of an alternating A/B runs: rounds of one replay each, every round in the
    order of the one before reversed (A B, B A, A B, ...), so that neither value always runs first: replays drift
    as a whole (in both pairs of session 14's A/B of two codes on an H200, the replay run first was the slower,
    every request in it by ~0.5–1 ms at the median, whichever code it was)."""
    r, p = divmod(k, variants)
    return p if r % 2 == 0 else variants - 1 - p


def keep(variant: tuple[Path, dict], result: dict, label: str, policy: str, mode: str, sweep: list[dict]) -> None:
    """Write a variant's trace.json with ``label``'s points so far (``sweep``, the last one perhaps of fewer
    replays than asked) and its ``max_functions`` among them."""
    out, settings = variant
    ok_ns = [p["n"] for p in sweep if p["attainment"] >= 0.98]
    # The node's options with each policy: policies run by separate invocations share the file, whose top-level
    # options are the last invocation's.
    result["policies"][label] = {"max_functions": max(ok_ns, default=0), "sweep": sweep, "scheduler": policy,
                                 "engine_mode": mode, "options": {k: result[k] for k in NODE_OPTIONS} | settings}
    (out / "trace.json").write_text(json.dumps(result, indent=1))


def alternates(spec: str | None, out: Path) -> list[tuple[Path, dict]]:
    """``--alternate SETTING=A,B``: each value's output directory and the setting to apply before its runs;
    without it, OUT itself and no change."""
    if spec is None:
        return [(out, {})]
    key, sep, values = spec.partition("=")
    if not sep or not values:
        raise SystemExit(f"--alternate wants SETTING=A,B, not {spec!r}")
    parsed = [json.loads(v) for v in values.split(",")]
    return [(out / f"{key}_{str(v).lower()}", {key: v}) for v in parsed]


if __name__ == "__main__":
    main()
