"""The ``swapserve`` command."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

from swapserve.config import MiB, env, parse_bytes
from swapserve.errors import SwapserveError


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapserve", description="GPU-efficient serverless inference.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="swap a zoo model in and run it (works without a GPU)")
    d.add_argument("--model", default="resnet18", help="zoo model (default resnet18)")
    d.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    d.add_argument("--pool", default="256MiB", help="device weight pool (default 256MiB)")
    d.add_argument("--runs", type=int, default=5)
    d.set_defaults(func=_demo)
    return p


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
