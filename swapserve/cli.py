"""The ``swapserve`` command."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swapserve.config import MAX_LANES, MiB, env, parse_bytes
from swapserve.errors import SwapserveError

if TYPE_CHECKING:
    from swapserve.client import Client
    from swapserve.node.config import ServeConfig


def _demo(args: argparse.Namespace) -> int:
    """Build a zoo model's artifact, then swap it in and run it through the engine, cold and warm."""
    import torch

    from swapserve.artifact import build_artifact, load_artifact, zoo
    from swapserve.config import EngineConfig
    from swapserve.engine import HostStore, SwapEngine

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    z = zoo.get(args.model)
    art_dir = env().home / "demo" / args.model
    if not (art_dir / "manifest.json").exists():
        print(f"building the {args.model} artifact (torch.export, safetensors) in {art_dir} ...", flush=True)
        t0 = time.perf_counter()
        build_artifact(z.build(), z.example(), art_dir, name=args.model, max_batch=4, overwrite=True)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    art = load_artifact(art_dir)
    x = art.examples()
    store = HostStore(env().shm_dir / f"swapserve-demo-{id(art)}", 4 << 30)
    pool = max(parse_bytes(args.pool), -(-art.manifest.nbytes // (32 * MiB)) * 32 * MiB)
    engine = SwapEngine(EngineConfig(device=device, pool_bytes=pool), store)
    try:
        engine.add(args.model, art)
        print(f"{args.model}: {art.manifest.nbytes / 1e6:.1f} MB of weights in the host store; device {device}, "
              f"{engine.mode} mode", flush=True)

        def run() -> tuple[float, list[torch.Tensor]]:
            t = time.perf_counter()
            out = engine.infer(args.model, x)
            return (time.perf_counter() - t) * 1e3, out

        first_ms, ref = run()
        print(f"  first swap (placement{', graph capture' if engine.mode == 'graph' else ''}): {first_ms:8.2f} ms")
        cold, warm = [], []
        identical = True
        for _ in range(args.runs):
            engine.evict(args.model)
            ms, out = run()
            cold.append(ms)
            identical &= all(torch.equal(a, b) for a, b in zip(out, ref))
            ms, out = run()
            warm.append(ms)
            identical &= all(torch.equal(a, b) for a, b in zip(out, ref))
        print(f"  cold swap-in + run:        {statistics.median(cold):8.2f} ms (median of {args.runs})")
        print(f"  resident run:              {statistics.median(warm):8.2f} ms")
        print(f"  swapped output == resident output, bit for bit: {identical}")
        top = ref[0].float().flatten()[:5].tolist()
        print(f"  output {art.manifest.outputs[0].name} {list(ref[0].shape)}: {[round(v, 4) for v in top]} ...")
        return 0 if identical else 1
    finally:
        engine.close()
        store.close()


# --- client commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from swapserve.client import Client

    return Client(url=getattr(args, "url", None), token=getattr(args, "token", None))


def _deploy(args: argparse.Namespace) -> int:
    """Build the bundle here (the tenant's model code runs on the client), pack it, upload it."""
    from swapserve.functions.build import build_bundle
    from swapserve.functions.bundle import pack

    client = _client(args)
    with tempfile.TemporaryDirectory(prefix="swapserve-deploy-") as tmp:
        bundle = Path(tmp) / "bundle"
        spec = build_bundle(Path(args.dir), bundle, progress=lambda line: print(line, flush=True))
        archive = pack(bundle)
        print(f"{spec.name}: uploading {archive.stat().st_size / 1e6:.1f} MB to {client.url} ...", flush=True)
        info = client.deploy(archive)
    print(f"{_field(info, 'name') or spec.name}: version {info.get('version', '?')}, {info.get('state', '?')}"
          + (f" ({info['reason']})" if info.get("reason") else ""))
    return 0


def _ls(args: argparse.Namespace) -> int:
    functions = _client(args).list_functions()
    rows = [("NAME", "VERSION", "STATE", "SLO_MS", "MAX_BATCH", "WEIGHTS")]
    for f in functions:
        spec = f.get("spec") or {}
        rows.append((str(_field(f, "name")), str(f.get("version", "")), str(f.get("state", "")),
                     f"{spec.get('slo_ms', '')}", str(spec.get("max_batch", "")), _size(f.get("nbytes"))))
    if len(rows) == 1:
        print("no functions deployed")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _rm(args: argparse.Namespace) -> int:
    _client(args).delete(args.name)
    print(f"deleted {args.name}")
    return 0


def _invoke(args: argparse.Namespace) -> int:
    import numpy as np

    client = _client(args)
    if args.body is not None:
        return _invoke_json(client, args)
    meta = client.model_metadata(args.name)
    declared = {t["name"]: t for t in meta.get("inputs", [])}
    inputs: dict[str, np.ndarray] = {}
    if args.random:
        rng = np.random.default_rng(args.seed)
        for name, t in declared.items():
            inputs[name] = _random_tensor(rng, t["datatype"], [1 if d == -1 else int(d) for d in t["shape"]])
    for item in args.input or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--input {item!r}: expected NAME=FILE.npy or NAME=JSONLIST")
        if name not in declared:
            raise UsageError(f"--input {name}: {args.name} has no input {name!r} (inputs: {', '.join(declared)})")
        inputs[name] = _read_input(name, value, declared[name])
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise UsageError(f"missing inputs {missing}: give --input NAME=... for each, or --random")
    import swapserve.gateway.oip  # noqa: F401 - the codec's first import is not part of the latency

    t0 = time.perf_counter()
    outputs = client.infer(args.name, inputs, binary=not args.json)
    ms = (time.perf_counter() - t0) * 1e3
    for name, t in outputs.items():
        flat = t.reshape(-1)[:6].tolist()
        print(f"{name}: {str(t.dtype).removeprefix('torch.')} {list(t.shape)} "
              f"{[round(v, 5) if isinstance(v, float) else v for v in flat]}{' ...' if t.numel() > 6 else ''}")
    print(f"latency: {ms:.2f} ms (round trip, {'binary' if not args.json else 'JSON'} tensors)")
    return 0


def _invoke_json(client: Client, args: argparse.Namespace) -> int:
    """``--body``: the JSON route of a function with a handler."""
    if args.input or args.random:
        raise UsageError("--body sends one JSON value to the function's handler; it takes no --input/--random")
    text = args.body
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise UsageError(f"--body {args.body}: {e.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--body: not JSON ({e})") from None
    t0 = time.perf_counter()
    answer = client.invoke_json(args.name, value)
    ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps(answer, indent=1))
    print(f"latency: {ms:.2f} ms (round trip, JSON route)")
    return 0


def _status(args: argparse.Namespace) -> int:
    s = _client(args).status()
    print(f"node: {'ready' if s.get('ready') else 'not ready'}, {s.get('functions', 0)} functions, "
          f"{s.get('queued', 0)} requests queued")
    print(f"host store: {_size(s.get('host_store_bytes'))} of {_size(s.get('host_store_capacity'))}")
    for d in s.get("devices", []):
        gpu = f", the machine's GPU {d['gpu']}" if d.get("gpu") else ""
        print(f"{d.get('device')} ({d.get('name', '')}{gpu}): pool {_size(d.get('pool_used_bytes'))} of "
              f"{_size(d.get('pool_bytes'))}{', busy' if d.get('busy') else ''}"
              f"{'' if d.get('serving', True) else ', OUT OF SERVICE'}")
        print(f"  resident: {', '.join(d.get('resident') or []) or '-'}"
              + (f"; partial: {', '.join(d['partial'])}" if d.get("partial") else ""))
    for p in s.get("sandboxes") or []:
        cold = p.get("cold_start_p50_ms")
        print(f"sandboxes of {p.get('function')}: {p.get('busy', 0)} busy, {p.get('idle', 0)} idle, "
              f"{p.get('starting', 0)} starting, {p.get('queued', 0)} requests waiting; {p.get('started', 0)} started"
              f" (cold start p50 {f'{cold:.0f} ms' if cold is not None else '-'}), {p.get('replaced', 0)} replaced, "
              f"{p.get('requests', 0)} requests, {p.get('failed', 0)} failed")
    for k, v in (s.get("extra") or {}).items():
        print(f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Parse the flags into a ServeConfig and run the node (swapserve.node.serve)."""
    config = serve_config(args)
    try:
        from swapserve.node.serve import run
    except ModuleNotFoundError as e:
        if e.name != "swapserve.node.serve":
            raise
        raise UsageError("this installation has no node server (swapserve.node.serve)") from None
    return int(run(config) or 0)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """``swapserve serve``'s flags as a ServeConfig: flags not given keep the config's defaults (which read
    the environment); a bad combination is a UsageError naming every problem."""
    from swapserve.node.config import ServeConfig, parse_devices

    given = {k: v for k, v in {
        "home": Path(args.home).expanduser() if args.home else None,
        "host": args.host, "port": args.port, "fronts": args.fronts,
        "devices": parse_devices(args.devices) if args.devices is not None else None,
        "pool_bytes": args.pool, "workspace_bytes": args.workspace, "lanes": args.lanes,
        "swap_piece_ms": args.swap_piece_ms, "queue_ahead": args.queue_ahead,
        "queue_ahead_within_ms": args.queue_ahead_within_ms,
        "side_fetch": args.side_fetch, "peer_copies": args.peer_copies, "place_ahead": args.place_ahead,
        "gateway_margin": args.gateway_margin, "slo_values": args.slo_values,
        "host_store_bytes": args.host_store, "max_body_bytes": args.max_body, "max_upload_bytes": args.max_upload,
        "token": getattr(args, "token", None), "demo": args.demo or None,
        "policy": args.policy, "mode": args.mode, "prepare": False if args.no_prepare else None,
        "spin_ms": args.spin_ms, "sandbox_isolation": args.sandbox_isolation, "sandbox_idle_s": args.sandbox_idle_s,
    }.items() if v is not None}
    try:
        return ServeConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None


# --- helpers ------------------------------------------------------------------------------------


class UsageError(SwapserveError):
    """A command line that cannot be acted on."""

    http_status = 400


def _field(info: dict[str, Any], key: str) -> Any:
    """A function's field, at the top level or inside its spec."""
    return info.get(key, (info.get("spec") or {}).get(key))


def _size(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _random_tensor(rng: Any, datatype: str, shape: list[int]) -> Any:
    """Random data of a declared input. Integers are 0 or 1: valid token ids and attention masks for
    any model, where larger values could index past a vocabulary."""
    from swapserve.tensors import numpy_dtype

    dtype = numpy_dtype("FP32" if datatype == "BF16" else datatype)
    if dtype.kind == "f":
        return _as_declared(rng.standard_normal(shape), datatype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)


def _as_declared(arr: Any, datatype: str) -> Any:
    """``arr`` cast to an OIP datatype: a numpy array, or for BF16 (which numpy lacks) a torch tensor."""
    from swapserve.tensors import numpy_dtype

    if datatype != "BF16":
        return arr.astype(numpy_dtype(datatype))
    import torch

    return torch.from_numpy(arr.astype("float32")).to(torch.bfloat16)


def _read_input(name: str, value: str, declared: dict[str, Any]) -> Any:
    """``FILE.npy`` (loaded without pickle) or a JSON list; cast to the declared datatype, and given a
    batch dimension of 1 when it has one dimension fewer than declared."""
    import numpy as np

    if value.endswith(".npy"):
        try:
            arr = np.load(value, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"--input {name}: cannot read {value}: {e}") from None
    else:
        try:
            arr = np.asarray(json.loads(value))
        except (json.JSONDecodeError, ValueError) as e:
            raise UsageError(f"--input {name}: not a .npy file nor a JSON list: {e}") from None
    if arr.ndim == len(declared["shape"]) - 1:
        arr = arr[None]
    return _as_declared(arr, declared["datatype"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapserve", description="GPU-efficient serverless inference.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    # Client flags are accepted before or after the subcommand; SUPPRESS keeps a subcommand's unset flag
    # from overwriting one given before it.
    p.add_argument("--url", help="the node's URL (default: $SWAPSERVE_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="management token (default: $SWAPSERVE_TOKEN)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default=argparse.SUPPRESS, help="the node's URL (default: $SWAPSERVE_URL)")
    remote.add_argument("--token", default=argparse.SUPPRESS, help="management token (default: $SWAPSERVE_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="swap a zoo model in and run it (works without a GPU)")
    d.add_argument("--model", default="resnet18", help="zoo model (default resnet18)")
    d.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    d.add_argument("--pool", default="256MiB", help="device weight pool (default 256MiB)")
    d.add_argument("--runs", type=int, default=5)
    d.set_defaults(func=_demo)

    s = sub.add_parser("deploy", parents=[remote], help="build a function directory's bundle and deploy it")
    s.add_argument("dir", help="a directory with function.yaml (see examples/)")
    s.set_defaults(func=_deploy)
    s = sub.add_parser("ls", parents=[remote], help="list deployed functions")
    s.set_defaults(func=_ls)
    s = sub.add_parser("rm", parents=[remote], help="delete a function")
    s.add_argument("name")
    s.set_defaults(func=_rm)
    s = sub.add_parser("invoke", parents=[remote], help="run one request and print the outputs and latency")
    s.add_argument("name")
    s.add_argument("--input", action="append", metavar="NAME=FILE.npy|NAME=JSONLIST",
                   help="an input tensor (repeat for each input)")
    s.add_argument("--random", action="store_true",
                   help="random inputs of the declared shapes, batch 1 (from GET /v2/models/NAME)")
    s.add_argument("--seed", type=int, default=0, help="seed for --random")
    s.add_argument("--json", action="store_true", help="send and receive tensors as JSON, not binary")
    s.add_argument("--body", metavar="JSON|@FILE",
                   help="a function with a handler: send this JSON value to its simple route instead of tensors")
    s.set_defaults(func=_invoke)
    s = sub.add_parser("status", parents=[remote], help="devices, pool use, resident models, host store, queue")
    s.set_defaults(func=_status)

    s = sub.add_parser("serve", help="run a node: gateway, controller and one worker per device")
    s.add_argument("--home", help="state directory (default: $SWAPSERVE_HOME or ~/.swapserve)")
    s.add_argument("--host", help="listen address (default: $SWAPSERVE_URL's host, else 127.0.0.1; 0.0.0.0 for "
                                   "every interface)")
    s.add_argument("--port", type=int, help="listen port (default: $SWAPSERVE_URL's port, else 8000)")
    s.add_argument("--devices", help='"cpu", "cuda:0,cuda:1" or "0,1"; "cpu:0,cpu:1" for several CPU workers '
                                     '(default: every GPU, else cpu)')
    s.add_argument("--pool", type=_bytes, help="weight pool per device, e.g. 16GiB (default: sized at start)")
    s.add_argument("--workspace", type=_bytes, help="activation workspace per device and lane (default 512MiB)")
    s.add_argument("--lanes", type=int, choices=range(1, MAX_LANES + 1), metavar="K",
                   help=f"runs in flight per device, 1 to {MAX_LANES}: 2 (default) runs resident models beside a "
                        "swap, 3 or 4 more of them side by side, 1 one thing at a time")
    s.add_argument("--swap-piece-ms", type=float, metavar="MS",
                   help="a long swap with time to spare comes in pieces of about this much copying, serving what "
                        "is due first between them (default 3; 0: in one go)")
    s.add_argument("--queue-ahead", action=argparse.BooleanOptionalAction, default=None,
                   help="a device's first lane takes one more run behind the one it runs, started by the worker "
                        "when that ends, with no round trip through the controller (default: on)")
    s.add_argument("--queue-ahead-within-ms", type=float, metavar="MS",
                   help="queue ahead only when the run ahead is expected to end within MS (default: whenever; "
                        "PATCH /api/v1/scheduling changes it on a running node)")
    s.add_argument("--side-fetch", action=argparse.BooleanOptionalAction, default=None,
                   help="a device's second lane may bring a model in by kernel beside the first lane's swap and "
                        "run it, when that finishes first (default: on; needs two lanes)")
    s.add_argument("--peer-copies", action=argparse.BooleanOptionalAction, default=None,
                   help="a model another device holds may be copied from there (NVLink) instead of from host "
                        "memory, when that finishes first (default: on for a node of two or more GPUs, off for CPU "
                        "workers; PATCH /api/v1/scheduling changes it on a running node)")
    s.add_argument("--place-ahead", action=argparse.BooleanOptionalAction, default=None,
                   help="a run queued behind another in a device's first lane has its pages placed (evictions, "
                        "remaps) and its copies started while the run before it executes (default: on; PATCH "
                        "/api/v1/scheduling changes it on a running node)")
    s.add_argument("--gateway-margin", action=argparse.BooleanOptionalAction, default=None,
                   help="plan each request to finish early enough for its time in the gateway: its decoding, and "
                        "its answer's way out as learned for the function (default: on; PATCH "
                        "/api/v1/scheduling changes it on a running node)")
    s.add_argument("--slo-values", action=argparse.BooleanOptionalAction, default=None,
                   help="eviction values weigh a swap's cost to a function's next request as a share of its SLO, "
                        "so that models of tight SLOs stay before large ones with room to swap (default: off; "
                        "PATCH /api/v1/scheduling changes it on a running node)")
    s.add_argument("--host-store", type=_bytes,
                   help="pinned host store capacity (default: half the free space of the shared-memory directory, "
                        "within the machine's available memory; more than either is refused)")
    s.add_argument("--max-body", type=_bytes, metavar="SIZE",
                   help="largest request body, e.g. 16MiB; larger ones are answered 413 (default 64MiB)")
    s.add_argument("--max-upload", type=_bytes, metavar="SIZE",
                   help="largest deploy upload (a function's compressed bundle: about its model's size; "
                        "default 8GiB)")
    s.add_argument("--token", default=argparse.SUPPRESS,
                   help="token the management API requires (default: $SWAPSERVE_TOKEN)")
    s.add_argument("--demo", action="store_true", help="deploy the example functions from examples/ at start")
    s.add_argument("--policy", choices=["swapserve", "fifo_lru", "dedicated"],
                   help="scheduling policy (default swapserve; the others are baselines for benchmarks)")
    s.add_argument("--mode", choices=["auto", "graph", "eager", "ondemand"],
                   help="engine mode (default auto: CUDA graphs on GPUs; ondemand is the .to(cuda) baseline)")
    s.add_argument("--no-prepare", action="store_true",
                   help="do not swap each function in and capture its graphs at deploy/start (capture on first use)")
    s.add_argument("--sandbox-isolation", choices=["strict", "best_effort", "off"],
                   help="handler sandboxes: strict refuses to run handlers without Landlock file isolation "
                        "(default best_effort: what the kernel offers, what is missing logged)")
    s.add_argument("--sandbox-idle-s", type=float, metavar="S",
                   help="stop a handler sandbox idle this long, down to what recent load needs (default 300)")
    s.add_argument("--fronts", type=int, metavar="K",
                   help="HTTP front processes sharing the port, each running the gateway and passing calls to "
                        "the controller (default 0: the controller serves HTTP itself); for busy multi-GPU nodes")
    s.add_argument("--spin-ms", type=float, metavar="MS",
                   help="while runs are in flight and this long after each arrival and each run's end, the "
                        "controller polls instead of sleeping, and each worker this long after each answer "
                        "(costs up to a core each while requests flow; 0: off; "
                        "default 1 on GPU nodes with at least 4 + 3 per GPU + 1 per front cores, else 0)")
    s.set_defaults(func=_serve)
    return p


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SwapserveError as e:
        print(f"swapserve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
