"""``swapserve serve``: the gateway, the controller and one worker process per device, in one command.

Start order: the HTTP server comes up first (liveness answers at once; readiness says 503 until every
worker is up and the registered functions are loaded), then the workers, then the functions. SIGTERM or
SIGINT stops admitting, lets in-flight requests finish within a grace period, fails what is queued, stops
the workers and removes the node's shared memory: no orphan processes, nothing left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from swapserve.config import MiB
from swapserve.errors import ArtifactError
from swapserve.fronts.service import FrontService, FrontStartError
from swapserve.gateway.config import GatewayConfig
from swapserve.heap import pauses, settle
from swapserve.hostmem import available_memory, host_store_problem, keep_freed_memory, reserve_bytes
from swapserve.node.config import ServeConfig
from swapserve.node.runlog import STALL_MS

if TYPE_CHECKING:
    from swapserve.gateway.fast import Listener
    from swapserve.metrics import Metrics
    from swapserve.node.controller import Node

log = logging.getLogger("swapserve.serve")

GRACE_S = 10.0
"""How long in-flight requests get to finish on shutdown."""


SHOW_FUNCTIONS = 20
"""Functions named in the ready line (a node may have thousands)."""


def run(config: ServeConfig) -> int:
    """Run a node until SIGTERM/SIGINT. Returns the process exit code."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import torch

    # This process only moves request tensors (decode, slab copies, encode): torch's intra-op thread pool
    # would wake sleeping threads for each copy above its grain size, which costs more than the copy
    # (milliseconds when the workers hold the cores). Compute happens in the workers.
    torch.set_num_threads(1)
    keep_freed_memory()  # outputs still copied out of the IO slabs go into fresh tensors: no page faults each time
    return asyncio.run(_main(config))


def _token(config: ServeConfig) -> str:
    """The management token: given, or generated once and kept in the home (mode 0600)."""
    if config.token:
        return config.token
    path = config.home / "token"
    if path.is_file():
        return path.read_text().strip()
    token = new_token()
    config.home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"generated a management token (saved in {path}); use it with:\n  export SWAPSERVE_TOKEN={token}",
          flush=True)
    return token


def new_token() -> str:
    """A random management token that never starts with '-' (one that did was taken for a flag when given
    back as ``--token TOKEN``: base64url draws '-' a 64th of the time)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def _default_host_store_bytes(config: ServeConfig, devices: Sequence[str]) -> int:
    """Half the free space of the shared-memory directory, within what the machine's memory leaves the node."""
    config.shm_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(config.shm_dir).free // 2
    available = available_memory()
    if available is not None:
        free = min(free, available - reserve_bytes(devices))
    return max(256 * MiB, free)


async def _main(config: ServeConfig) -> int:
    from swapserve.metrics import Metrics, watch_loop
    from swapserve.node.controller import Node, NodeConfig
    from swapserve.sandbox import SandboxConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    devices = config.resolved_devices()
    host_store_bytes = config.host_store_bytes
    if host_store_bytes is None:
        host_store_bytes = _default_host_store_bytes(config, devices)
    elif (problem := host_store_problem(host_store_bytes, config.shm_dir, devices)) is not None:
        print(f"swapserve: {problem}", file=sys.stderr)
        return 2
    metrics = Metrics()
    node = Node(NodeConfig(home=config.home, devices=devices, pool_bytes=config.pool_bytes,
                           workspace_bytes=config.workspace_bytes, lanes=config.lanes,
                           swap_piece_ms=config.swap_piece_ms, queue_ahead=config.queue_ahead,
                           queue_ahead_within_ms=config.queue_ahead_within_ms, side_fetch=config.side_fetch,
                           peer_copies=config.resolved_peer_copies(devices), place_ahead=config.place_ahead,
                           gateway_margin=config.gateway_margin, slo_values=config.slo_values,
                           host_store_bytes=host_store_bytes,
                           mode=config.mode, policy=config.policy, prepare_on_deploy=config.prepare,
                           spin_s=config.resolved_spin_ms(devices) / 1e3,
                           sandbox=SandboxConfig(isolation=config.sandbox_isolation,  # type: ignore[arg-type]
                                                 idle_s=config.sandbox_idle_s)),  # type: ignore[arg-type]
                metrics)  # opens the registry: a home already in use is refused before anything is written
    token = _token(config)
    gateway = GatewayConfig(token=token, uploads_dir=node.registry.staging_root, max_body_bytes=config.max_body_bytes,
                            max_upload_bytes=config.max_upload_bytes, max_bundle_bytes=config.max_bundle_bytes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        http = await _listen(config, node, gateway, metrics)
    except (OSError, FrontStartError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        print(f"swapserve: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
        await node.stop(0)  # nothing started yet: closes the registry, removes the node's shared memory
        return 2
    fronts = f" ({config.fronts} HTTP processes)" if config.fronts else ""
    print(f"swapserve listening on http://{config.host}:{config.port}{fronts} — starting {len(devices)} worker(s) "
          f"on {', '.join(devices)}", flush=True)
    starting = asyncio.ensure_future(_start(node, config))
    stopping = asyncio.ensure_future(stop.wait())
    lag = asyncio.ensure_future(watch_loop(metrics.observe_loop_lag))
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        print(f"swapserve: the node failed to start: {starting.exception()}", file=sys.stderr)
        code = 1
    elif starting.done():
        await stop.wait()
    print("swapserve: stopping (finishing in-flight requests)", flush=True)
    starting.cancel()
    stopping.cancel()
    lag.cancel()
    http.drain()
    await node.stop(GRACE_S)
    await http.close()
    print("swapserve: stopped", flush=True)
    return code


class _Listener(Protocol):
    def drain(self) -> None:
        """Stop taking connections; requests in flight go on."""
        ...

    async def close(self) -> None:
        """Once the node stopped: close what is left."""
        ...


class _Gateway:
    """The gateway in this process (no fronts): the aiohttp app behind its fast path
    (:mod:`swapserve.gateway.fast`)."""

    def __init__(self, runner: web.AppRunner, listener: Listener):
        self.runner = runner
        self.listener = listener

    def drain(self) -> None:
        pass  # the node answers 503 once it stops; the listener closes after it

    async def close(self) -> None:
        await self.listener.close(GRACE_S)
        await self.runner.cleanup()


async def _listen(config: ServeConfig, node: Node, gateway: GatewayConfig, metrics: Metrics) -> _Listener:
    """Serve HTTP on the configured address: here, or through ``config.fronts`` front processes. Raises OSError
    or FrontStartError if it cannot."""
    if config.fronts:
        service = FrontService(node, metrics, config.host, config.port, config.fronts, gateway)
        await service.start()
        return service
    from swapserve.gateway import make_app
    from swapserve.gateway.fast import listen

    runner = web.AppRunner(make_app(node, gateway, metrics), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        listener = await listen(runner, node, gateway, metrics, host=config.host, port=config.port)
    except OSError:
        await runner.cleanup()
        raise
    return _Gateway(runner, listener)


async def _start(node: Node, config: ServeConfig) -> None:
    await node.start(progress=lambda line: print(f"swapserve: {line}", flush=True))
    _settle_heap(node)
    names = [f.spec.name for f in node.list_functions()]
    shown = ", ".join(names[:SHOW_FUNCTIONS])
    if len(names) > SHOW_FUNCTIONS:
        shown += f" and {len(names) - SHOW_FUNCTIONS} more"
    print(f"swapserve ready: {len(names)} function(s): {shown}" if names else "swapserve ready: no functions yet",
          flush=True)
    if config.demo:
        await _deploy_demo(node, config)


async def build_apart(src: Path, out: Path, progress: Callable[[str], None]) -> None:
    """Build ``src``'s bundle into ``out`` in a process of its own (``python -m swapserve.functions.build``),
    each of its steps given to ``progress``, as ``swapserve deploy`` builds on the client's side. In the node's
    process the build — the model's code and torch.export, Python all the way (5 s for the demo's ResNet-50 on
    the CI box) — would hold the event loop serving the other functions, and its garbage the heap (the demo's
    three builds there set off nine collections of 19–160 ms each after the node was ready). Raises
    :class:`ArtifactError` with the build's message if it fails; a cancelled build's process is killed."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "swapserve.functions.build", str(src), str(out),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        errors = asyncio.ensure_future(proc.stderr.read())
        async for line in proc.stdout:
            progress(line.decode(errors="replace").rstrip())
        err = (await errors).decode(errors="replace").strip()
        if await proc.wait() != 0:
            raise ArtifactError(err.splitlines()[-1] if err else f"the build of {src} exited with {proc.returncode}")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


def _settle_heap(node: Node) -> None:
    """Move everything alive now (modules, registry, specs, artifacts' metadata: ~250k objects with 300
    functions) out of the cyclic collector's reach: a full collection scanning them stalls every request
    in flight for ~100 ms. Objects made later (requests) are collected as usual, and each that holds the
    process :data:`~swapserve.node.runlog.STALL_MS` or more is kept in the run log's stalls. The workers settle
    theirs after each model they add (``AddModel``)."""
    frozen = settle(log, "controller")
    log.info("controller: %d objects frozen (a full collection took %.0f ms)", frozen.objects, frozen.collect_ms)
    if (watch := pauses()) is not None:
        watch.record, watch.record_ms = node.dispatch.keep_pause, STALL_MS


async def _deploy_demo(node: Node, config: ServeConfig) -> None:
    """Build and deploy the example functions that are not deployed yet, each built in a process of its own
    (:func:`build_apart`)."""
    from swapserve.functions.spec import load_spec

    have = {f.spec.name for f in node.list_functions()}
    for src in config.demo_dirs():
        if not src.is_dir():
            print(f"swapserve: demo function {src} not found (a source checkout has examples/)", file=sys.stderr)
            continue
        if load_spec(src).name in have:  # deployed on an earlier start: no need to build it again
            continue
        staging = Path(tempfile.mkdtemp(dir=node.registry.staging_root))
        try:
            print(f"swapserve: building demo function {src.name} ...", flush=True)
            await build_apart(src, staging / "bundle", lambda line: print(f"swapserve:   {line}", flush=True))
            spec = load_spec(staging / "bundle")
            print(f"swapserve: deploying demo function {spec.name} ...", flush=True)
            info = await node.deploy(staging / "bundle")
            print(f"swapserve: {info.spec.name} v{info.version} ready", flush=True)
        except Exception as e:  # noqa: BLE001 - one demo failing must not stop the node
            print(f"swapserve: demo function {src.name} failed: {e}", file=sys.stderr)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
