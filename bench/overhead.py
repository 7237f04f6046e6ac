"""Gateway + scheduler overhead per request on a tiny resident model, and requests/s under load.

Starts a real ``swapserve serve`` (its own processes), deploys a tiny MLP, then from client processes:

  * sequential requests over one keep-alive connection: overhead = HTTP round trip − the model's run as
    its worker timed it (``compute_ms`` in the response), p50/p99; also split into gateway+transport
    (round trip − node time) and controller (node time − compute). The client is a blocking socket
    (``bench/http1.py``), so that the client's own Python costs as little of the round trip as it can;
    Python's ``http.client`` is measured beside it (``p50_overhead_ms_stdlib_client``);
  * concurrent clients for a fixed time: max requests/s (batching on, max_batch 8), from ``http1`` clients.

    python bench/overhead.py --out bench/results/<gpu>_<yyyymmdd> [--devices cuda:0] [--requests 3000]
        [--server-cpus 0-7 --client-cpus 8-15]

``--server-cpus`` and ``--client-cpus`` pin the node's processes and the clients to CPUs of their own (as
``taskset -c`` takes them): whether the runs' spread comes from where the processes land.

Writes overhead.json ``{"gpu", "p50_overhead_ms", "p99_overhead_ms", "max_rps", ...}``, overhead.md and
overhead.png (``--render`` redraws the plot from the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http1 import BlockingConnection, Client  # noqa: E402
from node_harness import Server, cpu_list, tiny_function  # noqa: E402
from stats import percentile  # noqa: E402
from canary import Canary  # noqa: E402
from steal import StealMeter  # noqa: E402

NAME = "tiny"
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}).encode()
PATH = f"/v2/models/{NAME}/infer"
HEADERS = {"Content-Type": "application/json"}
STDLIB_REQUESTS = 1000
"""Sequential requests from Python's http.client, after the lean client's: how much a heavier client adds."""


PARTS: dict[str, Callable[[float, dict], float]] = {
    "http": lambda rtt, p: rtt - p["server_ms"] - p.get("read_ms", 0.0),
    "read": lambda rtt, p: p.get("read_ms", 0.0),
    "gateway": lambda rtt, p: p["server_ms"] - p["total_ms"],
    "queue": lambda rtt, p: p["queue_ms"],
    "dispatch": lambda rtt, p: p["dispatch_ms"],
    "to_worker": lambda rtt, p: p["to_worker_ms"],
    "worker": lambda rtt, p: p["worker_ms"] - p["compute_ms"],
    "from_worker": lambda rtt, p: p["from_worker_ms"],
    "controller": lambda rtt, p: p["total_ms"] - p["queue_ms"] - p["dispatch_ms"] - p["to_worker_ms"] - p["worker_ms"]
    - p["from_worker_ms"],
}
"""Where a request's round trip went outside its run, from the response's timings (ms): the client, HTTP and
the encoding of the response (round trip − ``server_ms`` − ``read_ms``); the serving process's reading of the
request until its handler runs (``read_ms``); the gateway's decoding and checks before the node took
it (``server_ms − total_ms``); the node's queue and dispatch (the decision, inputs into the IO slab); the message's
way to the worker; the worker's own work besides the run; the reply's way back; the controller's work on the reply."""


def _lean_post(port: int) -> Callable[[], tuple[int, bytes]]:
    conn = BlockingConnection("127.0.0.1", port)

    def post() -> tuple[int, bytes]:
        r = conn.request("POST", PATH, BODY, HEADERS)
        return r.status, r.body
    return post


def _stdlib_post(port: int) -> Callable[[], tuple[int, bytes]]:
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def post() -> tuple[int, bytes]:
        conn.request("POST", PATH, BODY, HEADERS)
        resp = conn.getresponse()
        return resp.status, resp.read()
    return post


def sequential(post: Callable[[], tuple[int, bytes]], n: int, warmup: int,
               measuring: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """``n`` requests after ``warmup`` more, one at a time; ``measuring()`` is called as the first measured
    one leaves."""
    out: dict[str, list[float]] = {"rtt": [], "compute": [], "node": [], "lane": [], **{k: [] for k in PARTS}}
    phases: dict[str, list[float]] = {}
    for i in range(warmup + n):
        if i == warmup:
            measuring()
        t0 = time.perf_counter()
        status, data = post()
        rtt = (time.perf_counter() - t0) * 1e3
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        if i >= warmup:
            p = json.loads(data)["parameters"]
            out["rtt"].append(rtt)
            out["compute"].append(p["compute_ms"])
            out["node"].append(p["total_ms"])
            out["lane"].append(p["lane"])
            for k, f in PARTS.items():
                out[k].append(f(rtt, p))
            for k, v in p["phases_ms"].items():
                phases.setdefault(f"phase_{k}", []).append(v)
    out.update(phases)
    return out


def by_lane(seq: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """For each lane the sequential requests ran in: how many, and their p50 overhead, compute and worker part
    (ms) — whether a run's lane goes with a slow mode (the compute of one H200 lease's runs sat near 0.22 or near
    0.45 ms, run by run)."""
    lanes: dict[str, list[int]] = {}
    for i, lane in enumerate(seq["lane"]):
        lanes.setdefault(str(int(lane)), []).append(i)
    return {lane: {"requests": len(ix),
                   "p50_overhead_ms": percentile([seq["rtt"][i] - seq["compute"][i] for i in ix], 50),
                   "p50_compute_ms": percentile([seq["compute"][i] for i in ix], 50),
                   "p50_worker_ms": percentile([seq["worker"][i] for i in ix], 50)}
            for lane, ix in sorted(lanes.items())}


def _load_client(port: int, seconds: float, concurrency: int, q: mp.Queue) -> None:
    async def main() -> tuple[int, int]:
        ok = bad = 0
        stop = time.perf_counter() + seconds
        client = Client("127.0.0.1", port)

        async def loop() -> None:
            nonlocal ok, bad
            while time.perf_counter() < stop:
                r = await client.request("POST", PATH, BODY, HEADERS)
                ok, bad = (ok + 1, bad) if r.status == 200 else (ok, bad + 1)

        try:
            await asyncio.gather(*(loop() for _ in range(concurrency)))
        finally:
            client.close()
        return ok, bad

    q.put(asyncio.run(main()))


def throughput(port: int, seconds: float, processes: int, concurrency: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_load_client, args=(port, seconds, concurrency, q)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    return ok / seconds, sum(r[1] for r in results)


def plot(result: dict, out: Path) -> None:
    """overhead.png: the medians of the request path's parts, and the overhead against its target."""
    from bars import bars

    bars(out / "overhead.png", f"Request overhead — {result['gpu']}, {result['date']}",
         [("overhead p50", result["p50_overhead_ms"]), ("overhead p99", result["p99_overhead_ms"]),
          ("gateway + HTTP p50", result["p50_gateway_ms"]), ("controller + IPC p50", result["p50_controller_ms"]),
          ("the run p50", result["p50_compute_ms"])], target=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--render", action="store_true", help="only redraw the plot from OUT/overhead.json")
    ap.add_argument("--devices", default="", help="cpu, cuda:0, ... (default: every GPU, else cpu)")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4, help="client processes for the throughput run")
    ap.add_argument("--concurrency", type=int, default=32, help="connections per client process")
    ap.add_argument("--spin-ms", type=float, help="the server's --spin-ms (default: its own)")
    ap.add_argument("--fronts", type=int, default=0, help="the server's --fronts (default 0: no HTTP fronts)")
    ap.add_argument("--server-cpus", type=cpu_list, help="CPUs the node's processes may run on, e.g. 0-7 (default all)")
    ap.add_argument("--client-cpus", type=cpu_list,
                    help="CPUs this process and its client processes may run on, e.g. 8-15 (default all)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        plot(json.loads((args.out / "overhead.json").read_text()), args.out)
        return
    from swapserve.client import Client
    from swapserve.functions.build import build_bundle
    from swapserve.functions.bundle import pack

    work = Path(tempfile.mkdtemp(prefix="swapserve-overhead-"))
    extra = (("--spin-ms", str(args.spin_ms)) if args.spin_ms is not None else ()) + ("--fronts", str(args.fronts))
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # the client processes started later inherit it
    with Server(work / "home", args.devices or "all", pool="1GiB", workspace="512MiB", host_store="2GiB",
                extra=extra, cpus=args.server_cpus) as srv:
        srv.wait_ready()
        build_bundle(tiny_function(work / "fn", NAME, slo_ms=1000.0), work / "bundle")
        client = Client(srv.url, srv.token)
        client.deploy(pack(work / "bundle"))
        status = client.status()
        gpu = status["devices"][0]["name"]
        spin_ms = client.scheduling()["spin_ms"]  # the node's own where not given (its default depends on it)
        print(f"server up on {gpu}; sequential requests ...", flush=True)
        steal, canary = StealMeter(), Canary()
        canary.start()  # a process: started before the warm-up, so that its start is not measured

        def measuring() -> None:
            steal.start()
            canary.mark()
        seq = sequential(_lean_post(srv.port), args.requests, args.warmup, measuring)
        cpu_steal, cpu_canary = steal.stop(), canary.stop()
        std = sequential(_stdlib_post(srv.port), STDLIB_REQUESTS, args.warmup)
        over = [r - c for r, c in zip(seq["rtt"], seq["compute"])]
        gateway = [r - n for r, n in zip(seq["rtt"], seq["node"])]
        controller = [n - c for n, c in zip(seq["node"], seq["compute"])]
        print(f"overhead p50 {percentile(over, 50):.3f} ms, p99 {percentile(over, 99):.3f} ms; throughput run ...",
              flush=True)
        rps, errors = throughput(srv.port, args.seconds, args.clients, args.concurrency)
        log_tail = srv.tail(5)
        server_cpus = sorted(os.sched_getaffinity(srv.proc.pid))
    result = {
        "gpu": gpu,
        "p50_overhead_ms": percentile(over, 50),
        "p99_overhead_ms": percentile(over, 99),
        "max_rps": rps,
        "date": date.today().isoformat(),
        "requests": args.requests,
        "p50_rtt_ms": percentile(seq["rtt"], 50),
        "p50_compute_ms": percentile(seq["compute"], 50),
        "p50_gateway_ms": percentile(gateway, 50),
        "p50_controller_ms": percentile(controller, 50),
        "mean_overhead_ms": statistics.fmean(over),
        "p50_parts_ms": {k: percentile(seq[k], 50) for k in PARTS},
        "p50_run_phases_ms": {k.removeprefix("phase_"): percentile(v, 50) for k, v in seq.items()
                              if k.startswith("phase_")},
        "by_lane": by_lane(seq),
        "client": "blocking socket (bench/http1.py)",
        "p50_overhead_ms_stdlib_client": percentile([r - c for r, c in zip(std["rtt"], std["compute"])], 50),
        "throughput_clients": args.clients * args.concurrency,
        "throughput_errors": errors,
        "spin_ms": spin_ms,
        "fronts": args.fronts,
        "server_cpus": server_cpus,  # the serving process's affinity, as the system reports it
        "client_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_steal": cpu_steal,  # while the sequential requests ran (bench/steal.py)
        "cpu_canary": cpu_canary,  # the machine's speed at a fixed piece of Python meanwhile (bench/canary.py)
    }
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out)
    (args.out / "overhead.md").write_text(
        f"# Request overhead — {gpu}, {result['date']}\n\n"
        + (f"Through {args.fronts} HTTP front processes (serve --fronts {args.fronts}). " if args.fronts else "")
        + f"Tiny resident MLP, {args.requests} sequential JSON requests over one keep-alive connection after "
        f"{args.warmup} warm-up, from a blocking socket (bench/http1.py); overhead = HTTP round trip − the worker's "
        f"run (compute_ms). From Python's http.client ({STDLIB_REQUESTS} requests): "
        f"{result['p50_overhead_ms_stdlib_client']:.3f} ms p50. The controller polled {spin_ms:g} ms after each "
        "arrival and run's end (spin_ms; 0: it slept)."
        + (f" The node ran on CPUs {args.server_cpus and sorted(args.server_cpus)}, the clients on "
           f"{args.client_cpus and sorted(args.client_cpus)} (None: any)." if args.server_cpus or args.client_cpus
           else "")
        + (f" CPU steal while the sequential requests ran: {cpu_steal['fraction']:.1%} (worst second "
           f"{cpu_steal['max_window']:.1%}; bench/steal.py)." if cpu_steal else "")
        + (f" The canary's fixed work meanwhile: {cpu_canary['median_ms']:.3f} ms at the median (bench/canary.py)."
           if cpu_canary else "") + "\n\n"
        "| p50 overhead | p99 overhead | p50 round trip | p50 compute | p50 gateway+HTTP | p50 controller+IPC | max req/s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {result['p50_overhead_ms']:.3f} ms | {result['p99_overhead_ms']:.3f} ms | {result['p50_rtt_ms']:.3f} ms "
        f"| {result['p50_compute_ms']:.3f} ms | {result['p50_gateway_ms']:.3f} ms | {result['p50_controller_ms']:.3f} ms "
        f"| {rps:.0f} ({args.clients}×{args.concurrency} connections, {errors} errors) |\n\n"
        "Where the overhead went (p50 of each part, ms; see PARTS in bench/overhead.py):\n\n"
        "| " + " | ".join(PARTS) + " |\n|" + "---:|" * len(PARTS) + "\n"
        "| " + " | ".join(f"{result['p50_parts_ms'][k]:.3f}" for k in PARTS) + " |\n")
    print(json.dumps(result, indent=1))
    print(log_tail)


if __name__ == "__main__":
    main()
