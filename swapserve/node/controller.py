"""The controller: one process per node that owns the registry, the host store and the scheduler, and
drives one worker process per device.

Requests wait in per-model queues until a device is free (late binding); the pure scheduler decides
what runs where; the batch's inputs go to the chosen worker through its IO slab; the worker swaps the
model in while it runs (that request path is ``node/dispatch.py``; this module deploys, loads and
retires functions and their models, and runs the workers' lifecycle). A function without a handler is one model, queued under the function's name; a
function with a handler runs it in its sandbox pool, and each model call the handler makes is queued
like any request, under its model's name, due by the request's deadline (see ``node/handlers.py``).
Everything here runs on one asyncio loop; blocking work (artifact loading, filling the host store) goes
to threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from swapserve.artifact import Artifact, load_artifact
from swapserve.artifact.manifest import dtype_from_name
from swapserve.config import EngineConfig, MiB, env
from swapserve.engine import HostStore
from swapserve.errors import (
    BackendError, ConflictError, InvalidInputError, NotFoundError, SwapserveError, UnavailableError,
)
from swapserve.functions.spec import FunctionSpec, artifact_dir, load_spec
from swapserve.heap import Frozen
from swapserve.metrics import Metrics
from swapserve.node import handlers, runlog
from swapserve.node import workers as wk
from swapserve.node.api import DeviceStatus, FunctionInfo, FunctionState, InferResult, NodeStatus, SandboxStatus
from swapserve.node.dispatch import Dispatcher, OutputSink, reply_error
from swapserve.node.messages import (AddModel, CopyResult, DropPeer, Exported, ExportPages, Hello, ImportPeer,
                                     MeasureCopy, PeerResult, Prepare, Prepared, RemoveModel, allow_open_files)
from swapserve.node.slab import aligned
from swapserve.node.worker import WorkerConfig
from swapserve.sandbox import SandboxConfig, SandboxManager, SandboxPool, validate_handler
from swapserve.sandbox.types import PoolStats, SandboxEvent
from swapserve.scheduler.core import SWAP_PIECE_MS, Scheduler
from swapserve.scheduler.types import (
    DeviceState,
    SideLane,
    FunctionQueue,
    LinkProfile,
    ModelProfile,
    NodeState,
    Policy,
)
from swapserve.tensors import fits_shape, names_differ

log = logging.getLogger(__name__)

MIN_BUDGET = 0.5
"""The least share of a function's SLO the node plans a request to, whatever the gateway's margin."""


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    devices: tuple[str, ...]
    """``("cpu",)``, ``("cpu:0", "cpu:1", ...)`` or ``("cuda:0", "cuda:1", ...)``: one worker process each."""
    pool_bytes: int | None
    """Per device, for weights; None: sized by each worker from its device's free memory."""
    workspace_bytes: int = 2 << 30
    """Per device and lane."""
    lanes: int = 2
    """Runs in flight per device (see :attr:`swapserve.config.EngineConfig.lanes`)."""
    swap_piece_ms: float = SWAP_PIECE_MS
    """See :class:`swapserve.scheduler.Scheduler` (0: swaps in one go)."""
    queue_ahead: bool = True
    """See :class:`swapserve.scheduler.Scheduler`."""
    queue_ahead_within_ms: float | None = None
    """See :class:`swapserve.scheduler.Scheduler`."""
    side_fetch: bool = True
    """See :class:`swapserve.scheduler.Scheduler` (needs two lanes)."""
    peer_copies: bool = False
    """See :class:`swapserve.scheduler.Scheduler` (needs two or more devices)."""
    place_ahead: bool = True
    """See :class:`swapserve.scheduler.Scheduler`."""
    gateway_margin: bool = True
    """See :class:`swapserve.scheduler.Scheduler`."""
    slo_values: bool = False
    """See :class:`swapserve.scheduler.Scheduler`."""
    host_store_bytes: int = 64 << 30
    page_bytes: int = 32 * MiB
    slab_bytes: int = 256 * MiB
    """Each worker's IO slab for its lanes' inputs and outputs (one region a lane, two for the first)."""
    answers_bytes: int = 256 * MiB
    """Beside it, where each worker writes large answers that are sent from there (:mod:`swapserve.node.answers`):
    room for 19 of GPT-2's 12.9 MB in flight or being sent; beyond that they are copied out of the regions."""
    mode: str = "auto"
    policy: Policy = "swapserve"
    max_queued: int = 4096
    prepare_on_deploy: bool = True
    """Swap each new model in once on every device at deploy, capturing its graphs off the request path."""
    start_timeout_s: float = 300.0
    worker_restarts: int = 3
    """How many times a device's worker that died after the node was ready (its device lost, or the process
    killed) is started again in the node's life, its models added and prepared anew (and, where devices copy
    from each other, the pages shared anew); 0: never."""
    spin_s: float = 0.0
    """While runs are in flight and this long after each completion, the controller's event loop polls
    instead of sleeping, so that a worker's reply finds it awake (no wake-up on either side); costs up to a
    core while requests flow. 0: off. The workers never poll: a worker's polling thread held the GIL its lanes
    needed, and on an H200 that made the request overhead worse (session 11; polling on both sides). A running
    node changes it as the scheduling setting ``spin_ms``."""
    log_level: int = logging.WARNING
    sandbox: SandboxConfig = SandboxConfig()
    """Handler sandboxes (each function's ``sandbox:`` settings override timeout, memory and pool size; the
    node's home and shared memory are always denied to them)."""


LOADING_RETRY_S = 5.0
"""Retry-After of a request for a function being loaded (at the node's start, or on request): a model's load
took 2.5 s on a starting two-H200 node of 800 functions, 8 loading at once."""
RESTART_RETRY_S = 5.0
"""Retry-After of a request refused while no device serves and a worker starts again (which takes seconds: its
process, then every model prepared there)."""


@dataclass
class _Model:
    """One loaded model: a scheduler entity with its own queue, host-store copy and worker copies."""

    entity: str
    """The scheduler's name for it (see :func:`swapserve.node.handlers.entity`)."""
    key: str
    """Host-store / worker key of the loaded version."""
    artifact: Artifact
    outputs: tuple[str, ...]
    profile: ModelProfile
    """The scheduler's profile of its structure, shared by every entity of that structure (:meth:`Node._profile`)."""

    def answer_bytes(self, items: int) -> int:
        """The bytes a run of ``items`` rows writes into the IO slab: its outputs, each aligned there."""
        return sum(aligned(s.nbytes(items)) for s in self.artifact.manifest.outputs)


@dataclass
class _Function:
    spec: FunctionSpec
    version: int
    models: dict[str, _Model]
    """By model name; empty when the function is not loaded."""
    state: FunctionState
    reason: str = ""
    created_at: float = 0.0
    nbytes: int = 0
    direct: _Model | None = None
    """The model requests go straight to (a function without a handler)."""
    pool: SandboxPool | None = None
    """The handler's sandboxes (a function with a handler)."""

    def info(self) -> FunctionInfo:
        return FunctionInfo(self.spec, self.version, self.state, self.reason, self.nbytes, self.created_at)


class Node:
    """Implements :class:`swapserve.node.api.NodeAPI`."""

    def __init__(self, cfg: NodeConfig, metrics: Metrics | None = None, clock: Any = time.monotonic):
        from swapserve.registry import Registry

        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.clock = clock
        cfg.home.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(cfg.home)
        self.run_id = uuid.uuid4().hex[:8]
        self.shm_root = env().shm_dir / f"swapserve-{self.run_id}"
        self.store = HostStore(self.shm_root / "store", cfg.host_store_bytes)
        self.scheduler = Scheduler(cfg.policy, swap_piece_ms=cfg.swap_piece_ms, queue_ahead=cfg.queue_ahead,
                                   side_fetch=cfg.side_fetch, queue_ahead_within_ms=cfg.queue_ahead_within_ms,
                                   peer_copies=cfg.peer_copies, place_ahead=cfg.place_ahead,
                                   gateway_margin=cfg.gateway_margin, spin_ms=cfg.spin_s * 1e3,
                                   slo_values=cfg.slo_values)
        self.state = NodeState([], {}, {}, LinkProfile((1.0,)), max_queued=cfg.max_queued)
        self._workers: list[wk.WorkerHandle] = []
        self._functions: dict[str, _Function] = {}
        self._models: dict[str, _Model] = {}
        """Every scheduler entity that serves, by entity name."""
        self._entities: dict[str, str] = {}
        """The serving models' entity names by host-store key (what workers report residency by)."""
        self._retired: set[str] = set()
        """Model versions to remove from the workers and the host store once their last run ends."""
        self._ready = False
        self._live = True
        self._started = False
        """The node has been ready once: a worker that dies from then on is started again
        (:attr:`NodeConfig.worker_restarts`)."""
        self._stopping = False
        self._restarts: dict[int, int] = {}
        """Restarts so far, by device index."""
        self._restarting: set[asyncio.Task[None]] = set()
        self._watchers: list[Callable[[str | None], None]] = []
        self.loads = LoadTimes()
        """Where the models loaded so far spent their loading (the start's progress lines say it)."""
        self._structures: dict[str, ModelProfile] = {}
        """The scheduler's profile of each model structure loaded, shared by its entities (:meth:`_profile`)."""
        self.dispatch = Dispatcher(self.state, self.scheduler, self._workers, self.store, self._models,
                                   self._entities, self.metrics, clock, self._released,
                                   len(cfg.devices), cfg.lanes)
        # The zygote starts with the first handler (a node without handlers never imports torch twice).
        self.sandboxes = SandboxManager(self._call_model, replace(cfg.sandbox, deny_paths=(
            cfg.home.resolve(), self.shm_root, *cfg.sandbox.deny_paths)), clock=clock,
            on_event=self._sandbox_event)
        self.metrics.add_collector(lambda m: m.observe_status(self.snapshot()))

    def watch(self, changed: Callable[[str | None], None]) -> None:
        """Call ``changed(name)`` whenever function ``name`` is added, removed or changes state, and
        ``changed(None)`` when the node's readiness or liveness changes (HTTP fronts keep a catalog by it)."""
        self._watchers.append(changed)

    def _changed(self, name: str | None) -> None:
        for changed in self._watchers:
            changed(name)

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._changed(None)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, progress: Callable[[str], None] = log.info) -> None:
        """Start the workers, then load every registered function, saying how far it got through ``progress``
        (at most every 10 s). Each function serves as soon as it is loaded (READY; LOADING until then, and
        listed as such from the first moment); the node is ready once all are loaded."""
        (self.shm_root / "store").mkdir(parents=True, exist_ok=True)
        records = []
        for r in self.registry.list():
            if r.serving:
                records.append(r)
                state, reason = FunctionState.LOADING, "loading at the node's start"
            else:  # unloaded before the restart: listed, loadable, not loaded
                state, reason = FunctionState.UNAVAILABLE, "unloaded"
            self._functions[r.name] = _Function(r.spec, r.version, {}, state, reason, r.created_at, r.nbytes)
            self._changed(r.name)
        engine = EngineConfig(device="cpu", pool_bytes=self.cfg.pool_bytes or self.cfg.page_bytes,
                              workspace_bytes=self.cfg.workspace_bytes, page_bytes=self.cfg.page_bytes,
                              lanes=self.cfg.lanes)
        for i, dev in enumerate(self.cfg.devices):
            wcfg = WorkerConfig(i, dev, _engine_for(engine, dev, self.cfg.mode), str(self.store.root),
                                str(self.shm_root / f"io-{i}.bin"), self.cfg.slab_bytes + self.cfg.answers_bytes,
                                self.cfg.log_level, answers_bytes=self.cfg.answers_bytes,
                                auto_pool=self.cfg.pool_bytes is None)
            self._workers.append(wk.spawn(wcfg))
        hellos = await asyncio.gather(*(wk.wait_hello(w, self.cfg.start_timeout_s) for w in self._workers))
        for w in self._workers:
            wk.watch(w, self._on_worker_dead)
        self.state.devices = [self._device_state(i, h) for i, h in enumerate(hellos)]
        link = await self._profile_link([h.h2d_GBps for h in hellos], [h.fetch_GBps for h in hellos])
        self.state.link = replace(link, d2d_GBps=await self._share_pages())
        log.info("workers up: %s; link %s", [f"{h.device} ({h.name})" for h in hellos], self.state.link)
        if records:
            progress(f"loading {len(records)} registered functions")
        gate = asyncio.Semaphore(LOAD_AT_ONCE)
        loading = _Progress(len(records), self.store, progress, self.loads)

        async def bring_up(rec: Any) -> None:
            async with gate:
                try:
                    await self._bring_up(rec.spec, rec.path, rec.version, rec.created_at)
                except SwapserveError as e:
                    log.error("function %s v%d failed to load: %s", rec.name, rec.version, e)
                    self._functions[rec.name] = _Function(rec.spec, rec.version, {}, FunctionState.UNAVAILABLE,
                                                          f"failed to load at start: {e}", rec.created_at, rec.nbytes)
                    self._changed(rec.name)
                loading.one_done()

        await asyncio.gather(*(bring_up(r) for r in records))
        dead = [f"worker {w.index} ({w.device})" for w in self._workers if w.dead]
        if dead:  # a node is ready only with every device (:meth:`_on_worker_dead`): this one never would be
            raise BackendError(f"{', '.join(dead)} died while the node started (see the log above)")
        self._started = True
        self._set_ready(True)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop admitting, let in-flight work finish (up to ``grace_s``), fail what is queued, stop workers."""
        self._stopping = True
        self._set_ready(False)
        for task in list(self._restarting):  # a worker being started again stops with them (below)
            task.cancel()
        await asyncio.gather(*self._restarting, return_exceptions=True)
        deadline = self.clock() + grace_s
        await self.dispatch.drain(deadline)
        # Handlers still running get the grace period too (their model calls are still served), then their
        # sandboxes and the zygote stop.
        await self.sandboxes.close(grace_s=max(0.0, deadline - self.clock()))
        self.dispatch.fail_all(UnavailableError("the node is shutting down"))
        await asyncio.gather(*(wk.stop(w, max(1.0, deadline - self.clock())) for w in self._workers))
        self.dispatch.close()
        self.store.close()
        self.registry.close()
        shutil.rmtree(self.shm_root, ignore_errors=True)
        self._live = self.dispatch.live = False
        self._changed(None)

    def _on_worker_dead(self, w: wk.WorkerHandle) -> None:
        """Its device goes out of service (what was in flight there failed already); the node stays ready
        while another device serves. Then its worker is started again, as long as restarts are left."""
        self.state.devices[w.index].out = True  # the scheduler's view then holds nothing there
        self.state.forget_values()
        if self._started:
            self._set_ready(self._any_serving())
        done = self._restarts.get(w.index, 0)
        if not self._started or self._stopping or done >= self.cfg.worker_restarts:
            log.error("worker %d (%s) died; its device is out of service", w.index, w.device)
            return
        log.error("worker %d (%s) died; starting it again (%d of %d)", w.index, w.device, done + 1,
                  self.cfg.worker_restarts)
        self._restarts[w.index] = done + 1
        task = asyncio.get_running_loop().create_task(self._restart(w))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, old: wk.WorkerHandle) -> None:
        """Start a dead worker's device's worker again: a new process (its own IO slab), then every serving
        model added and prepared there as at deploy; its device serves again once that is done. What was in
        flight there failed with the old one; the host store (every model's weights) stayed. Where the workers
        map each other's pages, the others first unmap the dead one's (their mappings hold its memory on its
        device), then the new one and they map each other's."""
        i = old.index
        await asyncio.to_thread(old.process.join, 10)
        log.error("worker %d (%s) exited with status %s", i, old.device, old.process.exitcode)
        old.conn.close()
        for c in old.lane_conns:
            c.close()
        old.slab.close()  # mapped still while answers in flight are read from it: unlinked, not truncated
        Path(old.config.slab_path).unlink(missing_ok=True)
        peers = self.state.link.d2d_GBps is not None
        if peers:
            await self._drop_peer(i)
        cfg = replace(old.config, slab_path=str(self.shm_root / f"io-{i}.{self._restarts[i]}.bin"))
        new = wk.spawn(cfg)
        try:
            hello = await wk.wait_hello(new, self.cfg.start_timeout_s)
            self._workers[i] = new  # from here on deploys and removals reach it too
            wk.watch(new, self._on_worker_dead)
            self.state.devices[i] = replace(self._device_state(i, hello), out=True)  # until its models are there
            if peers:  # with the workers up now; one started again later maps with this one then (each pair once:
                # nothing awaits between taking its place above and listing them here)
                others = [w for w in self._workers if w is not new and not w.dead]
                await self._share(new, others)
                for w in others:
                    await self._share(w, [new])
            # Every serving model, those deployed meanwhile too (a deploy adds its own to it from now on).
            while missing := [m for m in self._models.values() if m.key not in new.models]:
                _raise_first(await self._install([new], missing[0].key, missing[0].artifact))
        except asyncio.CancelledError:  # the node stops: so does the new worker (not asked if not yet watched)
            await wk.stop(new, 5.0 if self._workers[i] is new else 0.5)
            raise
        except (SwapserveError, OSError) as e:
            log.error("worker %d (%s) could not be started again (%s); its device is out of service", i,
                      old.device, e)
            await wk.stop(new, 5.0)
            if peers:  # what the others mapped of the new one's pages
                await self._drop_peer(i)
            return
        self.state.devices[i].out = False
        self.dispatch.refresh_residency(everything=True)
        self.metrics.count_worker_restart(new.device)
        log.warning("worker %d (%s) is serving again", i, new.device)
        self._set_ready(self._any_serving())

    def _any_serving(self) -> bool:
        """Whether a device serves: the node is ready then (for a node started and not stopping)."""
        return not self._stopping and any(not d.out for d in self.state.devices)

    def _in_service(self, i: int) -> bool:
        """Whether device ``i`` serves: up (the node started it) and not out of service."""
        return i < len(self.state.devices) and not self.state.devices[i].out

    def _device_state(self, i: int, hello: Hello) -> DeviceState:
        """The scheduler's state of worker ``i``'s device, as its hello describes it, with nothing resident."""
        return DeviceState(i, hello.pool_bytes, side=[SideLane() for _ in range(self.cfg.lanes - 1)])

    async def _profile_link(self, alone: list[float], fetch: list[float]) -> LinkProfile:
        """Host→device bandwidth alone and with every device copying at once, a side lane's fetch (as each
        worker measured it at start), and how much a copy slows execution on the same device — measured
        here, on this machine."""
        n = len(self._workers)
        fetch_GBps = min(fetch) if self.cfg.lanes > 1 and min(fetch) > 0 else None
        if not self.cfg.devices[0].startswith("cuda"):  # CPU workers: memory copies, nothing to contend for
            return LinkProfile((min(alone),) * n, fetch_GBps=fetch_GBps)
        h2d = [min(alone)]
        if n > 1:
            start = time.time() + 0.2
            replies = await asyncio.gather(*(wk.call(w, MeasureCopy(wk.next_id(), 512 << 20, start))
                                             for w in self._workers))
            together = min(r.result.h2d_GBps for r in replies if r.ok and r.result)  # type: ignore[union-attr]
            h2d += [together] * (n - 1)
        probe = await wk.call(self._workers[0], MeasureCopy(wk.next_id(), 1 << 30, 0.0, exec_probe=True))
        slowdown, beside = 1.0, ()
        res = probe.result
        if probe.ok and isinstance(res, CopyResult) and res.exec_ms:
            slowdown, beside = max(1.0, res.exec_copying_ms / res.exec_ms), res.exec_beside
        return LinkProfile(tuple(h2d), None, slowdown, beside, fetch_GBps=fetch_GBps)

    async def _share_pages(self) -> float | None:
        """Every worker maps every other's pages, so that a run may copy a model from a device that lent it;
        returns the slowest pair's copy bandwidth, or None where devices cannot (one device, or a driver that
        cannot share pages: then the scheduler never copies from a peer)."""
        if len(self._workers) < 2:
            return None
        speeds = []
        try:
            for src in self._workers:
                speeds += await self._share(src, [w for w in self._workers if w is not src])
        except (BackendError, OSError) as e:
            log.warning("devices cannot copy from each other (%s): peer copies are off", e)
            return None
        return min(speeds)

    async def _share(self, src: wk.WorkerHandle, dsts: list[wk.WorkerHandle]) -> list[float]:
        """``dsts`` map ``src``'s pages; returns each one's copy bandwidth from them (GB/s). Raises BackendError
        or OSError if one cannot."""
        allow_open_files()
        exported = await wk.call(src, ExportPages(wk.next_id()))
        if not exported.ok or not isinstance(exported.result, Exported):
            raise BackendError(exported.error)
        fds = exported.result.fds
        try:
            replies = await asyncio.gather(*(wk.call(w, ImportPeer(wk.next_id(), src.index, len(fds)), fds)
                                             for w in dsts))
        finally:
            for fd in fds:
                os.close(fd)
        for r in replies:
            if not r.ok or not isinstance(r.result, PeerResult):
                raise BackendError(r.error)
        return [r.result.d2d_GBps for r in replies]

    async def _drop_peer(self, i: int) -> None:
        """Every other live worker unmaps device ``i``'s pages (a worker that cannot is logged: its mapping
        keeps the dead worker's memory on that device)."""
        others = [w for w in self._workers if w.index != i and not w.dead]
        replies = await asyncio.gather(*(wk.call(w, DropPeer(wk.next_id(), i)) for w in others),
                                       return_exceptions=True)
        for w, r in zip(others, replies):
            if isinstance(r, BaseException) or not r.ok:
                log.error("worker %d (%s) could not unmap device %d's pages: %s", w.index, w.device, i,
                          r if isinstance(r, BaseException) else r.error)

    def is_live(self) -> bool:
        return self._live

    def is_ready(self) -> bool:
        return self._ready

    # --- functions ----------------------------------------------------------------------------

    def list_functions(self) -> list[FunctionInfo]:
        return [f.info() for f in self._functions.values()]

    def get_function(self, name: str) -> FunctionInfo:
        return self._get(name).info()

    def _get(self, name: str) -> _Function:
        fn = self._functions.get(name)
        if fn is None:
            raise NotFoundError(f"no function {name!r}")
        return fn

    @staticmethod
    def _not_loading(fn: _Function, what: str) -> None:
        """ConflictError (409) while ``fn`` is being loaded — at the node's start, or by :meth:`load` — whose
        end would undo ``what`` (deploy, delete, unload, load) done meanwhile."""
        if fn.state is FunctionState.LOADING:
            raise ConflictError(f"function {fn.spec.name!r} is being loaded ({fn.reason}); {what} it once it is "
                                "READY")

    async def deploy(self, bundle: Path) -> FunctionInfo:
        spec, arts = await asyncio.to_thread(_check_bundle, bundle)
        if (fn := self._functions.get(spec.name)) is not None:
            self._not_loading(fn, "deploy")
        with self.registry.begin_deploy(spec.name):
            await self._validate_handler(spec, bundle, arts)
            models = await self._load_models(spec, arts)
            try:
                nbytes = sum(a.manifest.nbytes for a in arts.values())
                rec = await asyncio.to_thread(self.registry.commit, spec.name, bundle, spec, nbytes)
            except BaseException:
                await asyncio.gather(*(self._unload_everywhere(m.key) for m in models.values()))
                raise
            for name, m in models.items():  # the bundle moved into the registry: reload from there
                m.artifact = await asyncio.to_thread(load_artifact, Path(rec.path) / artifact_dir(name))
                self.store.get(m.key).artifact = m.artifact
            self._switch(spec, models, rec.version, rec.created_at, Path(rec.path))
        return self._functions[spec.name].info()

    async def _bring_up(self, spec: FunctionSpec, path: Path, version: int, created_at: float) -> None:
        arts = await asyncio.to_thread(_load_artifacts, spec, Path(path))
        spec.check_against({name: a.manifest for name, a in arts.items()})
        await self._validate_handler(spec, Path(path), arts)
        models = await self._load_models(spec, arts)
        self._switch(spec, models, version, created_at, Path(path))

    async def _validate_handler(self, spec: FunctionSpec, directory: Path, arts: dict[str, Artifact]) -> None:
        """Import the handler and run its setup() in a throwaway sandbox: HandlerLoadError (400) if it fails."""
        if spec.handler is None:
            return
        await validate_handler(directory, spec.handler, models=handlers.signatures(spec, arts),
                               config=handlers.sandbox_config(self.sandboxes.config, spec),
                               launcher=self.sandboxes.launcher)

    async def _load_models(self, spec: FunctionSpec, arts: dict[str, Artifact]) -> dict[str, _Model]:
        """Every model of the function loaded (host store and workers), or none of them."""
        names = list(arts)
        loads = await asyncio.gather(*(self._load_everywhere(handlers.entity(spec, n), arts[n]) for n in names),
                                     return_exceptions=True)
        failed = [r for r in loads if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(self._unload_everywhere(k[0]) for k in loads if isinstance(k, tuple)))
            raise failed[0]
        return {n: _Model(handlers.entity(spec, n), key, arts[n], tuple(o.name for o in arts[n].manifest.outputs),
                          profile) for n, (key, profile) in zip(names, loads)}  # type: ignore[misc]

    async def _load_everywhere(self, entity: str, art: Artifact) -> tuple[str, ModelProfile]:
        """Fill the host store and add the model to every worker (capturing its graphs there); its key and its
        structure's profile."""
        key = handlers.store_key(entity, uuid.uuid4().hex[:8])
        structure = await asyncio.to_thread(art.structure)
        began = time.monotonic()
        await asyncio.to_thread(self.store.add, key, art)
        filled = time.monotonic()
        try:
            replies = await self._install(self._live_workers(), key, art)
            _raise_first(replies)
            self.loads.add(filled - began, time.monotonic() - filled,
                           [r.result.first_ms / 1e3 for r in replies if isinstance(r.result, Prepared)])
            profile = self._profile(structure, replies, art.manifest.nbytes)
            # A worker started again meanwhile (:meth:`_restart`) adds what serves; this is not serving yet.
            _raise_first(await self._install([w for w in self._live_workers() if key not in w.models], key, art))
        except BaseException:
            await self._unload_everywhere(key)
            raise
        return key, profile

    async def _install(self, workers: list[wk.WorkerHandle], key: str, art: Artifact) -> list[Any]:
        """Add a model (already in the host store) to ``workers`` and, with ``prepare_on_deploy``, capture its
        graphs there (each batch size run once, resident); returns the preparations' replies (none without)."""
        for w in workers:
            w.models.add(key)
        added = await asyncio.gather(*(wk.call(w, AddModel(wk.next_id(), key, str(art.path))) for w in workers))
        _raise_first(added)
        for w, r in zip(workers, added):
            if isinstance(r.result, Frozen):
                log.debug("worker %d (%s) added %s: %d objects frozen, its collection took %.1f ms", w.index,
                          w.device, key, r.result.objects, r.result.collect_ms)
        if not self.cfg.prepare_on_deploy or not workers:
            return []
        self.store.acquire(key)
        try:
            buckets = _buckets(art.manifest.max_batch if art.manifest.dynamic_batch else 1)
            return await asyncio.gather(*(wk.call(w, Prepare(wk.next_id(), key, buckets)) for w in workers))
        finally:
            self.store.release(key)

    def _profile(self, structure: str, replies: list[Any], nbytes: int) -> ModelProfile:
        """The scheduler's profile of a model's structure (:meth:`Artifact.structure`), shared by every entity
        of that structure (:meth:`_add_entity`): what the scheduler learns from one's runs (their times, a
        swap's overhead) serves them all. With hundreds of functions of a few requests a minute, each
        function's own runs teach it little — in session 24's two-GPU replays at N = 800 a function swapped
        about twice — and the runs of one structure are alike. A structure new to the node is seeded with the
        resident run times by batch size from the model's Prepare on each worker (the fastest of them;
        ``replies``); a known one keeps what its runs taught it, taking only batch sizes it has no time for."""
        measured: dict[int, float] = {}
        for r in replies:
            if r.ok and isinstance(r.result, Prepared):
                for b, ms in r.result.exec_ms.items():
                    measured[b] = min(ms, measured.get(b, ms))
        prof = self._structures.get(structure)
        if prof is None:
            prof = self._structures[structure] = ModelProfile(nbytes, measured)
        else:
            for b, ms in measured.items():
                prof.exec_ms.setdefault(b, ms)
        return prof

    async def _unload_everywhere(self, key: str) -> None:
        for w in self._workers:
            w.models.discard(key)
        await asyncio.gather(*(wk.call(w, RemoveModel(wk.next_id(), key)) for w in self._live_workers()),
                             return_exceptions=True)
        if self.store.has(key):
            self.store.remove(key)

    def _switch(self, spec: FunctionSpec, models: dict[str, _Model], version: int, created_at: float,
                directory: Path) -> None:
        """Make ``models`` the serving version of ``spec.name`` (with a new sandbox pool if it has a handler);
        retire the previous version's models once idle."""
        old = self._functions.get(spec.name)
        pool = None
        if spec.handler is not None:
            sigs = handlers.signatures(spec, {n: m.artifact for n, m in models.items()})
            pool = self.sandboxes.add(spec.name, directory, spec.handler, sigs,
                                      config=handlers.sandbox_config(self.sandboxes.config, spec))
            pool.prewarm(1)  # the first request finds a sandbox ready (it idles out if none comes)
        elif old is not None and old.pool is not None:
            self.sandboxes.discard(spec.name)
        direct = None if spec.handler is not None else next(iter(models.values()))
        self._functions[spec.name] = _Function(spec, version, models, FunctionState.READY, "", created_at,
                                               sum(m.artifact.manifest.nbytes for m in models.values()), direct, pool)
        self._changed(spec.name)
        for m in models.values():
            self._add_entity(spec, m)
        for m in (old.models.values() if old is not None else ()):
            if m.entity not in {n.entity for n in models.values()}:
                self._drop_entity(m.entity, UnavailableError(f"function {spec.name!r} was redeployed without "
                                                             f"model {m.entity!r}"))
        self.dispatch.refresh_residency(everything=True)
        for m in (old.models.values() if old is not None else ()):
            self._retire(m.key)
        self.dispatch.pump()

    def _add_entity(self, spec: FunctionSpec, m: _Model) -> None:
        """Queue, profile and residency of one model entity, with the function's SLO and batching."""
        name, nbytes = m.entity, m.artifact.manifest.nbytes
        if (old := self._models.get(name)) is not None:
            self._entities.pop(old.key, None)
        self._models[name] = m
        self._entities[m.key] = name
        q = self.state.queues.get(name)
        if q is None:
            self.state.queues[name] = FunctionQueue(name, spec.slo_ms, spec.max_batch, spec.max_queue, spec.late_policy,
                                                    counted_since=self.clock())
        else:
            q.slo_ms, q.max_batch, q.max_queue, q.late_policy = spec.slo_ms, spec.max_batch, spec.max_queue, spec.late_policy
        replaced = self.state.profiles.get(name)
        self.state.profiles[name] = m.profile  # the name's model before (a redeploy may bring another) keeps its own
        if replaced is not None and replaced is not m.profile:
            self._forget_structures()
        self.state.touch(name)
        if self.cfg.policy == "dedicated" and name not in self.state.dedicated:
            self._dedicate(name, nbytes)
        for d in self.state.devices:
            d.resident.discard(name)
            d.partial.pop(name, None)

    def _drop_entity(self, name: str, error: SwapserveError) -> None:
        """Forget a model entity: its queued requests fail with ``error``; runs in flight finish."""
        self.dispatch.fail_queued(name, error)
        self.state.queues.pop(name, None)
        self.state.dedicated.pop(name, None)
        self.state.profiles.pop(name, None)
        self._forget_structures()
        if (m := self._models.pop(name, None)) is not None:
            self._entities.pop(m.key, None)
        self.state.touch(name)  # gone from every device: its eviction values are forgotten
        for d in self.state.devices:  # the workers' later reports of its key no longer name it
            d.resident.discard(name)
            d.partial.pop(name, None)
        if "/" in name:  # a handler's model: its series are not the function's (the gateway forgets those)
            self.metrics.forget_function(name)

    def _forget_structures(self) -> None:
        """Forget the profiles of structures no entity has any more (its last function deleted or redeployed
        with another model, or a load that failed)."""
        held = {id(p) for p in self.state.profiles.values()}
        self._structures = {k: p for k, p in self._structures.items() if id(p) in held}

    def _dedicate(self, name: str, nbytes: int) -> None:
        """Dedicated baseline: pin the function to the first device whose pool still has room for it."""
        need = -(-nbytes // self.cfg.page_bytes) * self.cfg.page_bytes
        for dev in self.state.devices:
            used = sum(-(-self.state.profiles[f].nbytes // self.cfg.page_bytes) * self.cfg.page_bytes
                       for f, d in self.state.dedicated.items() if d == dev.index and f in self.state.profiles)
            if used + need <= dev.pool_bytes:
                self.state.dedicated[name] = dev.index
                return

    def _retire(self, key: str) -> None:
        if self.dispatch.users(key):
            self._retired.add(key)  # removed when its last run completes
            return
        self._retired.discard(key)
        asyncio.ensure_future(self._unload_everywhere(key))

    def _released(self, key: str) -> None:
        if key in self._retired:
            self._retire(key)

    async def delete(self, name: str) -> None:
        fn = self._get(name)
        self._not_loading(fn, "delete")
        fn.state = FunctionState.UNLOADING
        del self._functions[name]
        self._changed(name)
        self._take_down(fn, UnavailableError(f"function {name!r} was deleted"))
        self.metrics.forget_function(name)
        await asyncio.to_thread(self.registry.delete, name)

    async def unload(self, name: str) -> FunctionInfo:
        fn = self._get(name)
        self._not_loading(fn, "unload")
        if fn.state is FunctionState.READY:
            fn.state = FunctionState.UNAVAILABLE
            fn.reason = "unloaded"
            self._changed(name)
            self._take_down(fn, UnavailableError(f"function {name!r} was unloaded"))
            await asyncio.to_thread(self.registry.set_serving, name, False)
        return fn.info()

    def _take_down(self, fn: _Function, error: SwapserveError) -> None:
        """Stop serving ``fn``: queued requests fail, its sandboxes stop once their requests end, its models
        leave the workers and the host store once their runs end."""
        if fn.pool is not None:
            self.sandboxes.discard(fn.spec.name)
        for m in fn.models.values():
            self._drop_entity(m.entity, error)
            self._retire(m.key)
        fn.models, fn.direct, fn.pool = {}, None, None

    async def load(self, name: str) -> FunctionInfo:
        fn = self._get(name)
        self._not_loading(fn, "load")
        if fn.state is not FunctionState.READY:
            rec = self.registry.get(name)
            fn.state, fn.reason = FunctionState.LOADING, "loaded on request"
            self._changed(name)
            try:
                await self._bring_up(rec.spec, rec.path, rec.version, rec.created_at)
            except SwapserveError as e:
                fn.state, fn.reason = FunctionState.UNAVAILABLE, str(e)
                self._changed(name)
                raise
            await asyncio.to_thread(self.registry.set_serving, name, True)
        return self._functions[name].info()

    # --- requests -----------------------------------------------------------------------------

    def _serving(self, name: str) -> _Function:
        """The function, if the node and it are ready for requests."""
        fn = self._get(name)
        if not self._ready and (self._started or self._stopping):  # (while it starts, what is loaded serves)
            if self._restarting and not self._stopping:
                raise UnavailableError("the node is not ready: its worker is starting again",
                                       retry_after=RESTART_RETRY_S)
            raise UnavailableError("the node is not ready")
        if fn.state is not FunctionState.READY:
            raise UnavailableError(f"function {name!r} is {fn.state.value}{': ' + fn.reason if fn.reason else ''}",
                                   retry_after=LOADING_RETRY_S if fn.state is FunctionState.LOADING else None)
        return fn

    async def infer(self, name: str, inputs: dict[str, torch.Tensor], request_id: str | None = None,
                    parameters: dict[str, Any] | None = None, sink: OutputSink | None = None,
                    margin_ms: float = 0.0) -> InferResult:
        fn = self._serving(name)
        if fn.pool is not None:
            return await self._handle(fn, inputs, parameters, margin_ms)
        m = fn.direct
        assert m is not None  # READY, no handler: one model
        tensors, items = _check_inputs(fn.spec, m.artifact.manifest, inputs)
        now = self.clock()
        return await self.dispatch.run(m.entity, tensors, items, now, now + self._budget_s(fn, margin_ms), request_id,
                                       sink, due=now + fn.spec.slo_ms / 1e3)

    def _budget_s(self, fn: _Function, margin_ms: float) -> float:
        """The part of ``fn``'s SLO the node plans its request to: all of it less the gateway's margin (setting
        ``gateway_margin``), but never less than :data:`MIN_BUDGET` of it — a margin gone wild (a client reading
        a large answer slowly) must not make every request of the function look late."""
        slo_ms = fn.spec.slo_ms
        if self.scheduler.gateway_margin:
            slo_ms -= min(max(margin_ms, 0.0), slo_ms * (1.0 - MIN_BUDGET))
        return slo_ms / 1e3

    async def infer_json(self, name: str, value: Any, parameters: dict[str, Any] | None = None) -> Any:
        fn = self._serving(name)
        if fn.pool is None:
            raise InvalidInputError(f"function {name!r} has no handler: the JSON route runs handlers; send its "
                                    f"tensors to POST /v2/models/{name}/infer")
        now = self.clock()
        result = await fn.pool.infer_json(value, parameters, deadline=now + fn.spec.slo_ms / 1e3)
        self._observe_handler(name, now)
        return result.json

    async def _handle(self, fn: _Function, inputs: dict[str, torch.Tensor],
                      parameters: dict[str, Any] | None, margin_ms: float) -> InferResult:
        """Run the function's handler on a tensor request. The SLO deadline, from now (less the gateway's
        margin), covers the whole run: every model call the handler makes is scheduled against it."""
        assert fn.pool is not None
        now = self.clock()
        budget_s = self._budget_s(fn, margin_ms)
        result = await fn.pool.infer(inputs, parameters, deadline=now + budget_s)
        outputs = handlers.check_outputs(fn.spec, result.outputs)
        total = self._observe_handler(fn.spec.name, now)
        return InferResult(outputs, "", result.wait_ms, False, result.handler_ms, total * 1e3, result.parameters,
                           budget_ms=budget_s * 1e3)

    def _observe_handler(self, name: str, started: float) -> float:
        fn = self._functions.get(name)
        now = self.clock()
        if fn is not None and now - started > fn.spec.slo_ms / 1e3:
            self.metrics.count_slo_miss(name)
        self.metrics.observe_node_request(name, now - started)
        return now - started

    async def _call_model(self, function: str, model: str, inputs: dict[str, torch.Tensor],
                          deadline: float, sink: OutputSink | None = None) -> dict[str, torch.Tensor]:
        """A handler's model call (the sandboxes' ``call_model``): queued like any request of that model, due
        by the handler's request's deadline, its outputs written where ``sink`` says (the sandbox's arena).
        ``inputs`` are checked against the model already."""
        fn = self._functions.get(function)
        m = fn.models.get(model) if fn is not None and fn.state is FunctionState.READY else None
        if m is None:
            raise UnavailableError(f"function {function!r} no longer serves model {model!r}")
        manifest = m.artifact.manifest
        tensors = [inputs[t.name] for t in manifest.inputs]
        for t, x in zip(manifest.inputs, tensors):
            if (why := t.index_error(x)) is not None:
                raise InvalidInputError(f"model {model!r} input {t.name!r}: {why}")
        items = tensors[0].shape[0] if manifest.dynamic_batch else 1
        return (await self.dispatch.run(m.entity, tensors, items, self.clock(), deadline, None, sink)).outputs

    def _live_workers(self) -> list[wk.WorkerHandle]:
        return [w for w in self._workers if not w.dead]

    # --- status -------------------------------------------------------------------------------

    async def status(self) -> NodeStatus:
        return self.snapshot()

    def snapshot(self) -> NodeStatus:
        """:meth:`status`, from synchronous code (the metrics collector)."""
        by_key = self._entities
        devices = []
        for w in self._workers:
            r = w.residency
            devices.append(DeviceStatus(
                w.device, w.hello.name if w.hello else "?", r.pool_bytes, r.used_bytes,
                tuple(sorted(by_key[k] for k, f in r.present.items() if f >= 1.0 and k in by_key)),
                tuple(sorted(by_key[k] for k, f in r.present.items() if f < 1.0 and k in by_key)),
                self.dispatch.busy(w.index), self._in_service(w.index), w.hello.gpu if w.hello else ""))
        return NodeStatus(self._ready, tuple(devices), len(self._functions), self.store.used_bytes,
                          self.store.capacity, self.state.queued,
                          {"h2d_GBps": self.state.link.h2d_GBps[0],
                           "h2d_GBps_all_copying": self.state.link.h2d_GBps[-1],
                           "exec_slowdown_copying": self.state.link.exec_slowdown_copying,
                           "copy_overhead_ms": self.state.link.copy_overhead_ms,
                           **{f"exec_slowdown_beside_{k + 1}": x
                              for k, x in enumerate(self.state.link.exec_slowdown_beside)},
                           **({"d2d_GBps": d2d} if (d2d := self.state.link.d2d_GBps) is not None else {}),
                           **{f"busy_seconds_{w.index}": self.dispatch.busy_s[w.index] for w in self._workers}},
                          tuple(_sandbox_status(p) for _, p in sorted(self.sandboxes.stats().items())))

    async def scheduling(self) -> dict[str, Any]:
        return self.scheduler.settings()

    async def runs(self, since: float | None = None, limit: int = runlog.RUNS_ANSWERED) -> dict[str, Any]:
        ring = self.dispatch.runs
        return {"now": self.clock(), "fields": list(runlog.FIELDS), "runs": [list(r) for r in ring.since(since, limit)],
                "stall_fields": list(runlog.STALL_FIELDS), "stalls": [list(x) for x in ring.stalls(since)]}

    async def configure_scheduling(self, changes: dict[str, Any]) -> dict[str, Any]:
        try:
            settings = self.scheduler.configure(self.state, changes)
        except ValueError as e:
            raise InvalidInputError(str(e)) from None
        log.info("scheduling settings changed: %s", settings)
        self.dispatch.pump()  # queued work may go otherwise now
        return settings

    def _sandbox_event(self, event: SandboxEvent) -> None:
        fn = self._functions.get(event.function)
        if fn is None:  # a deleted function's pool still reports its sandboxes stopping: its series are gone
            return
        if event.kind == "starting" and fn.state is FunctionState.READY:
            # The handler's model calls come once the sandbox is up (~20 ms of fork and isolation): copy its
            # models in meanwhile, where a device's first lane is idle, so the calls find them resident.
            for m in fn.models.values():
                self.dispatch.prefetch(m.entity)
        self.metrics.observe_sandbox(event)


def _sandbox_status(p: PoolStats) -> SandboxStatus:
    cold = sorted(c.total_ms for c in p.cold_starts)
    return SandboxStatus(p.function, p.starting, p.idle, p.busy, p.queued, p.started, p.replaced, p.requests,
                         p.failed, cold[len(cold) // 2] if cold else None)


def _buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the engine runs at (powers of two up to max_batch, then max_batch): capturing each at
    deploy keeps graph capture (tens of ms) off every request path."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def _engine_for(base: EngineConfig, device: str, mode: str) -> EngineConfig:
    if device.startswith("cpu"):
        return replace(base, device="cpu", mode="eager" if mode == "auto" else mode)  # type: ignore[arg-type]
    return replace(base, device=device, mode=mode)  # type: ignore[arg-type]


def _check_bundle(bundle: Path) -> tuple[FunctionSpec, dict[str, Artifact]]:
    spec = load_spec(bundle)
    arts = _load_artifacts(spec, Path(bundle))
    spec.check_against({name: a.manifest for name, a in arts.items()})
    return spec, arts


def _load_artifacts(spec: FunctionSpec, bundle: Path) -> dict[str, Artifact]:
    return {name: load_artifact(bundle / artifact_dir(name)) for name in spec.models}


def _check_inputs(fspec: FunctionSpec, manifest: Any, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Inputs in declared order, with their common batch size; checked against the manifest."""
    decl = fspec.inputs
    names = [d.name for d in decl]
    if set(inputs) != set(names):
        raise InvalidInputError(f"{fspec.name} takes inputs {names}{names_differ(names, inputs)}")
    out, batch = [], None
    for spec, d in zip(manifest.inputs, decl):
        x = inputs[d.name]
        if x.dtype != dtype_from_name(spec.dtype):
            raise InvalidInputError(f"input {d.name!r} must be {d.datatype}")
        shape = tuple(x.shape)
        ok, batch = fits_shape(shape, spec.shape, fspec.max_batch, batch)
        if not ok:
            raise InvalidInputError(f"input {d.name!r} must have shape {list(d.shape)} (-1: batch of 1 to "
                                    f"{fspec.max_batch}, the same for every input), got {list(shape)}")
        if (why := spec.index_error(x)) is not None:  # refused here, alone, not in a batch at the worker
            raise InvalidInputError(f"input {d.name!r}: {why}")
        out.append(x.contiguous())
    return out, batch or 1


LOAD_AT_ONCE = 8
"""Functions a starting node loads at once: host-store fills overlap each other and the workers' preparation."""


@dataclass
class LoadTimes:
    """Where loading models went: seconds summed over the models loaded (several at once)."""

    models: int = 0
    fill_s: float = 0.0
    """Writing each model's buffer into the host store."""
    install_s: float = 0.0
    """Adding it to every worker and preparing it there (its graphs captured, each batch size run once)."""
    first_s: float = 0.0
    """A worker's first runs of it (swapping it in, capturing its graphs), averaged over the workers: the
    device's own time on it, where ``install_s`` also counts the waits behind the models loaded beside it."""

    def add(self, fill_s: float, install_s: float, first_s: Sequence[float] = ()) -> None:
        self.models += 1
        self.fill_s += fill_s
        self.install_s += install_s
        self.first_s += sum(first_s) / len(first_s) if first_s else 0.0


class _Progress:
    """Start-up progress (a node of a thousand functions takes minutes to load): at most one line every
    ``every_s`` seconds, and the last — with what a model's load took on average (``loads``, the node's since
    its start), split into its host-store fill and its preparation on the workers: what bounds the start."""

    def __init__(self, total: int, store: HostStore, say: Callable[[str], None], loads: LoadTimes,
                 every_s: float = 10.0):
        self.total, self.store, self.say, self.loads, self.every_s = total, store, say, loads, every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def one_done(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done == self.total or now - self.last >= self.every_s:
            self.last = now
            n, loads = self.loads.models, self.loads
            split = (f"; a model's fill {loads.fill_s / n:.2f} s, its preparation on the workers "
                     f"{loads.install_s / n:.2f} s, {LOAD_AT_ONCE} at a time; a worker's first runs of one "
                     f"(swap in, graph capture) {loads.first_s / n:.2f} s" if n else "")
            self.say(f"loaded {self.done} of {self.total} functions in {now - self.started:.0f} s (host store "
                     f"{self.store.used_bytes / 1e9:.1f} GB{split})")


def _raise_first(replies: list[Any]) -> None:
    for r in replies:
        if not r.ok:
            raise reply_error(r)
