"""The swap engine of one device: models in pinned host memory, swapped in while they run.

``infer(name, inputs)`` binds the request to this device at once: it claims pages for the model's
missing slots (evicting the least valuable unpinned models, tail first), remaps only slots whose
page changed, starts the chunked host→device copies and runs the forward pass, which waits for each
chunk only at its first use. A resident model runs with no copy and no wait. In graph mode both
paths are single CUDA graph replays.

A device has one to four *lanes* (``EngineConfig.lanes``), each with its own stream and activation
workspace: lane 0 swaps models in and runs resident ones; the side lanes (1, 2, ...) run resident models
concurrently with lane 0 and each other, so that a hit need not wait behind another model's swap, and may
bring a model in first by kernel copies beside lane 0's swap (``fetch``). Each lane runs one request at a time
(its caller's thread blocks until the device is done); a graph capture has the device to itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from swapserve.artifact.load import Artifact
from swapserve.artifact.manifest import dtype_from_name
from swapserve.config import EngineConfig
from swapserve.engine.backend import Backend, Waiter, make_backend
from swapserve.engine.layout import Chunk, Layout, last_chunk_of
from swapserve.engine.pages import PagePool, Placement, PlacementPlan, Residency, Value
from swapserve.engine.program import Program, load_program
from swapserve.engine.store import HostEntry, HostStore
from swapserve.errors import (ArtifactError, BackendError, InvalidInputError, NotFoundError, NotResidentError,
                              PoolBusyError, WorkspaceError)
from swapserve.tensors import fits_shape

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since start (base units)."""

    runs: int = 0
    resident_runs: int = 0
    swaps: int = 0
    """Runs that copied at least one chunk."""
    bytes_copied: int = 0
    remaps: int = 0
    """Page slots remapped on the way to a run (each costs a driver map and set-access, and an unmap if the slot
    still mapped another page)."""
    unmapped_behind: int = 0
    """Slots unmapped off the request path after another model took their pages (:meth:`SwapEngine._unmap_idle`)."""
    pages_taken: int = 0
    """Pages taken from other models (partial evictions)."""
    placed_ahead: int = 0
    """Runs whose pages were placed while the run before them executed (:meth:`SwapEngine.place_ahead`)."""
    swap_seconds: list[float] = field(default_factory=list)
    """Wall time of recent swapped runs (the last 1000)."""
    swap_cpu_seconds: list[float] = field(default_factory=list)
    """Host CPU time the calling thread spent on each of those runs, before waiting for the device."""


PLACE_WAIT_S = 2.0
"""How long a swap waits for runs in other lanes to unpin the pages it needs before it fails (PoolBusyError)."""

UNMAP_AFTER_S = 1e-3
"""How long the device must have been idle (no placement, no run) before stale slots are unmapped: the last
run's answer goes out first (:meth:`SwapEngine._unmap_idle`)."""


@dataclass(frozen=True)
class RunInfo:
    """What one run did (:meth:`SwapEngine.last_run`)."""

    swapped: bool = False
    bytes_copied: int = 0
    evicted: int = 0
    """Models whose pages it took (wholly or partly evicted)."""
    from_peer: bool = False
    """Its bytes came from a peer device that lent the model, not from host."""
    remaps: int = 0
    """Slots its placement mapped onto other pages (driver calls: a map and an access grant each)."""
    remap_unmaps: int = 0
    """Of those, the slots that still mapped a page and unmapped it first (one more call each; the unmapper,
    :meth:`SwapEngine._unmap_idle`, spares them)."""
    wait_ms: float = 0.0
    """Waiting for the lane (a run before it) or for a graph capture to end."""
    upload_ms: float = 0.0
    """Putting the inputs on the device (queued there, not waited for)."""
    place_ms: float = 0.0
    """Pinning the model and its pages: evictions and remaps for a swap."""
    place_lock_ms: float = 0.0
    """The part of ``place_ms`` spent waiting for the engine's lock (another lane placing or finishing)."""
    place_remap_ms: float = 0.0
    """The part of ``place_ms`` spent remapping slots onto other pages (driver calls)."""
    place_remap_cpu_ms: float = 0.0
    """The calling thread's CPU time in those remaps: well under ``place_remap_ms`` when the calls wait (for
    the GIL, which each driver call gives up, or in the driver) rather than work."""
    device_ms: float = 0.0
    """Launch to the copies and compute landing (waited for), with the copies ``infer(output=...)`` enqueued."""
    placed_ahead: bool = False
    """Its pages were placed, and its copies started, while the run before it executed (its ``place_ms`` is
    what was left to do; its ``device_ms`` includes waiting for what was left of those copies)."""


@dataclass
class _Ahead:
    """Pages placed for lane 0's next run of a model while the run before it executes
    (:meth:`SwapEngine.place_ahead`)."""

    ticket: int
    """The run it is for (its :meth:`SwapEngine.infer` passes the same)."""
    done: threading.Event = field(default_factory=threading.Event)
    host: HostEntry | None = None
    plan: PlacementPlan | None = None
    """None once done: placing failed (the run places as usual)."""
    copies: Waiter | None = None
    """The plan's copies, started once the pages were placed (None: nothing to copy)."""


@dataclass
class _Lane:
    index: int
    stream: object | None
    """Its compute stream (lane 0: the backend's); None on the CPU."""
    workspace: object | None = None
    """Graph mode: the private memory pool its graphs' activations live in."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held for a whole run: a lane runs one request at a time."""


class _Gate:
    """Runs share the device; a graph capture has it alone (CUDA's global capture mode fails if another
    thread allocates or synchronizes meanwhile, and a capture's warm-up run uses the shared caches)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(frozen=True)
class PeerSource:
    """Where a run copies its missing bytes from instead of host memory: a device that lent the model
    (:meth:`SwapEngine.lend`), whose page ``pages[s]`` holds the model's slot s."""

    device: int
    pages: tuple[int, ...]


class _NeedsCapture(Exception):
    """Raised (before anything is launched) by a run that found it must capture while sharing the device."""


@dataclass
class _Model:
    name: str
    artifact: Artifact
    layout: Layout
    chunks: tuple[Chunk, ...]
    va: int
    program: Program
    events: object | None
    pinned_ptr: int = 0
    graphs: dict[int, object] = field(default_factory=dict)
    activation: dict[int, int | None] = field(default_factory=dict)
    ahead: _Ahead | None = None
    remapping: int = 0
    """Holders of its pins remapping its slots now (:meth:`SwapEngine._remap_taken`; lock held to change)."""
    unmapping: int = 0
    """Its stale slots being unmapped now (:meth:`SwapEngine._unmap_idle`; lock held to change)."""


class SwapEngine:
    """One device's engine. Thread-safe; runs one request at a time per lane."""

    def __init__(self, config: EngineConfig, store: HostStore, clock: Callable[[], float] = time.monotonic,
                 value: Value | None = None):
        self.config = config
        self.store = store
        self.clock = clock
        self.mode = config.resolved_mode
        self.backend: Backend = make_backend(config.device, config.page_bytes)
        self.backend.create_pages(config.num_pages)
        self.pool = PagePool(config.num_pages, config.page_bytes, **({"value": value} if value else {}))
        self.stats = EngineStats()
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        """Guards the models, the pool and the counters (never held while the device computes)."""
        self._unpinned = threading.Condition(self._lock)
        """Notified whenever a run unpins its model (a swap may be waiting for those pages)."""
        self._remapped = threading.Condition(self._lock)
        """Notified whenever a holder of a model's pins has remapped its slots (:meth:`_remap_taken`), and when its
        stale slots have been unmapped (:meth:`_unmap_idle`)."""
        self._peer_copies = threading.Lock()
        """Held while a run launches its copies from a peer's pages, and while a peer's pages are unmapped."""
        self._gate = _Gate()
        self._local = threading.local()
        self._placer: concurrent.futures.ThreadPoolExecutor | None = None
        """Places pages ahead of lane 0's next run (:meth:`place_ahead`); started with the first."""
        self._unmapper: concurrent.futures.ThreadPoolExecutor | None = None
        """Unmaps stale slots while the device is idle (:meth:`_unmap_idle`); started with the first."""
        self._stale: dict[str, None] = {}
        """Models whose pages a placement took since (an ordered set): their slots may map others' pages."""
        self._working = 0
        """Placements and runs in progress (:meth:`_placed`, :meth:`_place_ahead`; lock held to change)."""
        self._unmap_due = False
        """An :meth:`_unmap_idle` is queued and has not started yet."""
        streams = [getattr(self.backend, "compute_stream", None)] + [self.backend.new_stream()
                                                                      for _ in range(config.lanes - 1)]
        self.lanes = [_Lane(i, st, self._reserve_workspace(st) if self.mode == "graph" else None)
                      for i, st in enumerate(streams)]
        store.subscribe(self._on_spill)

    # --- models -------------------------------------------------------------------------------

    def add(self, name: str, artifact: Artifact) -> None:
        """Make a model runnable here (its host copy is added to the store if not there yet).

        On failure nothing is left behind: not in the pool, not in the store (if added here)."""
        with self._lock:
            if name in self._models:
                raise ArtifactError(f"model {name!r} is already on {self.config.device}")
            layout = Layout.of(artifact.manifest, self.config.align)
            self.pool.register(name, layout.nbytes)
            added_to_store = va = None
            try:
                chunks = layout.chunks(self.config.page_bytes, self.config.min_chunk_bytes, self.config.max_chunk_bytes)
                last = last_chunk_of(layout.slots, chunks)
                program = load_program(artifact, self.backend.device, {s.name: c for s, c in zip(layout.slots, last)})
                if not self.store.has(name):
                    self.store.add(name, artifact)
                    added_to_store = name
                va = self.backend.reserve(layout.nbytes)
                program.bind({s.name: self.backend.view(va + s.offset, s.nbytes).view(dtype_from_name(s.dtype))
                              .view(s.shape) for s in layout.slots})
            except BaseException:
                self.pool.unregister(name)
                if va is not None:
                    self.backend.release(va, layout.nbytes)
                if added_to_store:
                    self.store.remove(added_to_store)
                raise
            self._models[name] = _Model(name, artifact, layout, chunks, va, program,
                                        self.backend.new_events(len(chunks)))

    def remove(self, name: str) -> None:
        """Forget a model on this device (its host copy stays in the store)."""
        with self._lock:
            m = self._get(name)
        self._drop_ahead(m)
        with self._lock:
            self._await_unmapped(m)
            for slot, _page in self.pool.unregister(name):
                self.backend.unmap(m.va + slot * self.config.page_bytes)
            m.graphs.clear()
            self.backend.release(m.va, m.layout.nbytes)
            if m.pinned_ptr:
                entry = self.store.get(name)
                if entry.buffer is not None:
                    self.backend.unpin(entry.buffer)
            del self._models[name]

    def artifact(self, name: str) -> Artifact:
        return self._get(name).artifact

    def models(self) -> list[str]:
        return list(self._models)

    def residency(self, name: str) -> Residency:
        self._get(name)
        return self.pool.state(name)

    def placement(self, name: str) -> Placement:
        self._get(name)
        return self.pool.placements[name]

    def activation_bytes(self, name: str, batch: int) -> int | None:
        """Estimated peak activation bytes of a model at a batch size (None: unknown before running)."""
        m = self._get(name)
        if batch not in m.activation:
            m.activation[batch] = m.program.activation_bytes(batch)
        return m.activation[batch]

    def lend(self, name: str) -> tuple[int, ...] | None:
        """Pin a wholly resident model for a peer device to copy from, and say which page holds each of its
        slots; None (nothing pinned) if it is not wholly here. Its pages stay as they are until :meth:`unlend`."""
        with self._lock:
            self._get(name)
            return self.pool.lend(name)

    def unlend(self, name: str) -> None:
        """End a :meth:`lend`."""
        with self._lock:
            self._get(name)
            self.pool.release(name)
            self._unpinned.notify_all()

    def drop_peer(self, peer: int) -> None:
        """Unmap ``peer``'s pages (:meth:`Backend.drop_peer`) once every copy already launched from them has
        landed: its worker died, and a new one shares its own. A run sent to copy from them later copies from
        host instead."""
        with self._peer_copies:
            self.backend.synchronize()
            self.backend.drop_peer(peer)

    def evict(self, name: str) -> None:
        """Drop the model's device copy (the host copy stays)."""
        with self._lock:
            self._get(name)
            self.pool.evict(name)

    # --- placing ahead ------------------------------------------------------------------------

    def place_ahead(self, name: str, value: Value | None, ticket: int) -> None:
        """Start placing the pages a coming lane-0 run of ``name`` needs — evictions, and the remaps, whose
        driver calls burn ~0.05–1 ms of CPU a page (``bench/remap_cost.py``) — on a thread of the engine's own,
        now, while the runs before it execute, instead of when it starts; then copying its missing bytes into
        them, queued on the copy stream behind the copies of the run before (already launched: the copy
        engine serves them in order, so that run is not slowed), landing during its compute, its answer and
        the hand-over. The coming run then waits on the device for what is left of them and runs as a
        resident model does: the same graph, so the same bits. ``ticket`` names that run: its
        :meth:`infer` passes the same and finds the pages placed (waiting for the placing to end, if need be).
        Only for the run right behind the one lane 0 has launched (``infer(launched=...)``: its pages are
        pinned), never further back: pages pinned for a later run could be what an earlier one needs, and it
        would wait for them forever. Call it before that run can reach its infer. The pages stay pinned until
        that run ends; a run that does not come (its infer failed first, or another run of the model in lane 0
        came first) lets them go once the copies landed (and keeps what they brought). Does nothing if the model
        is already being placed ahead, or is on its way in with the launched run itself (a burst's second run
        of one model): that run's copies bring it, and placing it again would copy it a second time, behind
        them, for the next run to wait on."""
        with self._lock:
            m = self._get(name)
            if m.ahead is not None or self._in_flight(m):
                return
            m.ahead = a = _Ahead(ticket)
            if self._placer is None:
                self._placer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swapserve-placer")
        self._placer.submit(self._place_ahead, m, value, a)

    def _in_flight(self, m: _Model) -> bool:
        """Whether a run has ``m``'s pages pinned while some are still to land (lock held)."""
        placement = self.pool.placements.get(m.name)
        return placement is not None and bool(placement.pins) and self.pool.state(m.name) is not Residency.RESIDENT

    def _place_ahead(self, m: _Model, value: Value | None, a: _Ahead) -> None:
        try:
            with self._at_work(), self._gate.shared():  # never remapping during a capture
                with self._lock:
                    if self._in_flight(m):  # a side lane's fetch took it since: the run places it itself
                        return
                    host, plan = self._take_pages(m, value, None)
                self._remap_taken(m, plan)
                if plan.load:
                    assert host.buffer is not None
                    try:
                        a.copies = self.backend.start_copies(m.va, host.buffer, m.chunks,
                                                             self._copy_mask(m, plan.load), m.events)
                    except BaseException:
                        self._release(m)
                        raise
            a.host, a.plan = host, plan
        except Exception:  # noqa: BLE001 - the run places its pages itself
            log.debug("placing %s ahead failed; its run will", m.name, exc_info=True)
        finally:
            a.done.set()

    def _settle_ahead(self, m: _Model, ticket: int | None) -> None:
        """Before lane 0's run ``ticket`` of ``m`` takes the gate (which placing ahead takes too): wait for
        placing ahead to end, and let go of what was placed for another run."""
        a = m.ahead
        if a is None:
            return
        a.done.wait()
        if a.ticket != ticket or a.plan is None:
            self._drop_ahead(m)

    def _drop_ahead(self, m: _Model, ticket: int | None = None) -> None:
        """Let go of the pages placed ahead for ``m`` (for the run ``ticket`` only, if given)."""
        with self._lock:
            a = m.ahead
            if a is None or (ticket is not None and a.ticket != ticket):
                return
            m.ahead = None
        a.done.wait()
        if a.plan is not None:
            self._land_ahead(m, a)
            self._release(m)

    def _land_ahead(self, m: _Model, a: _Ahead) -> None:
        """Wait for the copies started ahead for a run that will not use them (failed or never came) before
        its pages are let go — a copy must not land in a page another model has taken — and count what they
        brought as loaded."""
        if a.copies is None or a.plan is None:
            return
        try:
            a.copies.finish()
        except BackendError:
            log.warning("copying %s ahead failed; its next run copies again", m.name, exc_info=True)
            return
        finally:
            a.copies = None
        with self._lock:
            self.pool.loaded(m.name, a.plan.load)

    def _release(self, m: _Model) -> None:
        """Unpin the model's pages and host buffer (one pin of each)."""
        with self._lock:
            self.pool.release(m.name)
            self.store.release(m.name)
            self._unpinned.notify_all()

    # --- running ------------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[bool]:
        """The engine's lock, for reading its pool consistently while lanes run."""
        return self._lock

    def last_run(self) -> RunInfo:
        """What the calling thread's last :meth:`infer` did (lanes run in threads of their own)."""
        return getattr(self._local, "last_run", RunInfo())

    def infer(self, name: str, inputs: Sequence[torch.Tensor], value: Value | None = None,
              lane: int = 0, fetch: bool = False, peer: PeerSource | None = None, ticket: int | None = None,
              launched: Callable[[], None] | None = None,
              output: Callable[[list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Run ``name`` on ``inputs`` in ``lane``, swapping it in if needed. Returns outputs on the device.

        ``output``, if given, is called with the outputs right after the run is launched, in the lane's stream
        (under :meth:`Backend.compute`), before the one wait for the run: copies it enqueues there (the outputs
        into host memory, ``non_blocking``) have landed when this returns — one wait for the run and its
        output, not two. Whatever it raises is raised once the run has landed.

        Lane 0 swaps pipelined (copy engine copies, compute waiting per chunk). Elsewhere a model not wholly
        resident raises :class:`NotResidentError` unless ``fetch``: then its missing bytes come first, by
        kernel on the lane's stream (:meth:`Backend.fetch`), sharing the host link with lane 0's copies
        instead of queueing behind them, and it runs as a resident model does — the same graph, so the same
        bits. A fetch still raises :class:`NotResidentError` for a model another lane has in flight, or one
        that would need a graph captured first.

        With ``peer`` (a device that lent it whole, :meth:`lend`), the missing bytes come from that device's
        pages (:meth:`Backend.fetch_peer`, NVLink on GPUs) on the lane's stream first, and it runs as a
        resident model does, in any lane; a run that must capture a graph first swaps from host instead.

        In lane 0, ``ticket`` names the run for :meth:`place_ahead` (its pages may have been placed while the
        run before it executed), and ``launched`` is called once the run is placed and launched, before
        waiting for it (the run behind it may be placed ahead from then on)."""
        if not 0 <= lane < len(self.lanes):
            raise ValueError(f"lane {lane} does not exist on {self.config.device} ({len(self.lanes)} lanes)")
        entered = time.perf_counter()
        ln = self.lanes[lane]
        try:
            with self._lock:
                m = self._get(name)
                inputs, batch = self._check_inputs(m, inputs)
                run_batch = self._bucket(m, batch)
                self._check_workspace(m, run_batch)
                capture = self.mode == "graph" and run_batch not in m.graphs
                if lane and capture and self.pool.state(m.name) is not Residency.RESIDENT:
                    raise NotResidentError(f"{m.name} has no graph at batch {run_batch} yet: lane 0 captures it")
            with ln.lock:
                if lane == 0:
                    self._settle_ahead(m, ticket)
                try:
                    with self._gate.exclusive() if capture else self._gate.shared():
                        return self._infer(m, inputs, batch, run_batch, ln, value, capture, entered, fetch,
                                           None if capture else peer, ticket, launched, output)
                except _NeedsCapture:  # the host buffer moved (reloaded after a spill): capture the swap graph anew
                    with self._gate.exclusive():
                        return self._infer(m, inputs, batch, run_batch, ln, value, True, entered, fetch, None,
                                           None, launched, output)
        except BaseException:
            if lane == 0 and ticket is not None and (gone := self._models.get(name)) is not None:
                self._drop_ahead(gone, ticket)  # its pages placed ahead, if it failed before taking them
            raise

    def _infer(self, m: _Model, inputs: list[torch.Tensor], batch: int, run_batch: int, ln: _Lane,
               value: Value | None, exclusive: bool, entered: float, fetch: bool,
               peer: PeerSource | None, ticket: int | None, launched: Callable[[], None] | None,
               output: Callable[[list[torch.Tensor]], None] | None) -> list[torch.Tensor]:
        started = time.perf_counter()

        def unpad(outs: list[torch.Tensor]) -> list[torch.Tensor]:
            if run_batch == batch:
                return outs
            return [o[:batch] if spec.shape[:1] == (-1,) else o for o, spec in zip(outs, m.artifact.manifest.outputs)]

        emit = (lambda outs: output(unpad(outs))) if output is not None else None
        with self.backend.compute(ln.stream):
            inputs = [self.backend.upload(x) for x in inputs]
            if run_batch != batch:  # graphs exist per bucket (1, 2, 4, ...): pad up to it
                inputs = [torch.cat([x, x.new_zeros((run_batch - batch, *x.shape[1:]))]) for x in inputs]
            uploaded = time.perf_counter()
            with self._placed(m, value, lane=ln.index, fetch=fetch or peer is not None, ticket=ticket) as (host, plan):
                placed = time.perf_counter()
                outs = self._run(m, host, plan, inputs, run_batch, ln, exclusive, peer, launched, emit)
        lock_ms, remap_ms, remap_cpu_ms = self._local.place_parts
        self._local.last_run = replace(self._local.last_run, wait_ms=(started - entered) * 1e3,
                                       upload_ms=(uploaded - started) * 1e3, place_ms=(placed - uploaded) * 1e3,
                                       place_lock_ms=lock_ms, place_remap_ms=remap_ms,
                                       place_remap_cpu_ms=remap_cpu_ms,
                                       device_ms=(time.perf_counter() - placed) * 1e3,
                                       placed_ahead=self._local.placed_ahead)
        return unpad(outs)

    def _bucket(self, m: _Model, batch: int) -> int:
        """The batch size a request runs at: a power of two (at most max_batch) in graph mode, so that a
        model has a handful of graphs rather than one per batch size."""
        if self.mode != "graph" or not m.artifact.manifest.dynamic_batch:
            return batch
        b = 1
        while b < batch:
            b *= 2
        return min(b, m.artifact.manifest.max_batch)

    def prefetch(self, name: str, max_bytes: int | None = None, value: Value | None = None) -> int:
        """Copy the model's missing pages without running it — all of them, or only as many of the first
        missing pages (in first-use order) as ``max_bytes`` needs, rounded up to whole pages (a piece of
        a swap) — as a run of lane 0 (the side lanes go on serving resident models meanwhile). Returns the bytes
        copied."""
        ln = self.lanes[0]
        with ln.lock, self._gate.shared():
            with self._lock:
                m = self._get(name)
            limit = None if max_bytes is None else -(-max_bytes // self.config.page_bytes)
            with self._placed(m, value, limit) as (host, plan):
                copy = self._copy_mask(m, plan.load)
                if plan.load:
                    assert host.buffer is not None
                    self.backend.start_copies(m.va, host.buffer, m.chunks, copy, m.events).finish()
                return self._landed(m, plan, copy)

    @contextlib.contextmanager
    def _placed(self, m: _Model, value: Value | None, limit: int | None = None, lane: int = 0,
                fetch: bool = False, ticket: int | None = None) -> Iterator[tuple[HostEntry, PlacementPlan]]:
        """:meth:`_place`, counted as work in progress (:meth:`_at_work`) until the run that holds it ends."""
        with self._at_work(), self._place(m, value, limit, lane, fetch, ticket) as placed:
            yield placed

    @contextlib.contextmanager
    def _place(self, m: _Model, value: Value | None, limit: int | None = None, lane: int = 0,
               fetch: bool = False, ticket: int | None = None) -> Iterator[tuple[HostEntry, PlacementPlan]]:
        """Pin the host buffer and the model's pages, remapped where the plan says; unpin after. Outside
        lane 0 the model must already be wholly on the device (checked with the pool locked, so that no
        swap takes its pages between the check and the pin), unless the run ``fetch``es it: then it must not
        be in flight in another lane (whose copies may be landing in its pages).

        The remaps run outside the engine's lock: they change only this model's range, onto pages the plan
        gave it (pinned, so nothing takes them back), and they can be slow — ~1 ms a page beside a swap's
        queued copies on a two-H200 machine, 0.17 ms on a one-H200 one (``bench/remap_cost.py``), more when the
        other lane's thread holds the GIL (``bench/worker_gil.py``) — which the other lane must not wait for.

        Lane 0's run ``ticket`` takes the pages placed for it ahead (:meth:`place_ahead`), if any."""
        asked = time.perf_counter()
        self._local.placed_ahead = False
        self._local.copies_ahead = None
        if lane == 0 and limit is None and ticket is not None and (a := m.ahead) is not None and a.ticket == ticket:
            assert a.host is not None and a.plan is not None and a.done.is_set()  # settled by infer
            with self._lock:
                m.ahead = None
                self.stats.placed_ahead += 1
            self._local.placed_ahead = True
            self._local.copies_ahead = a.copies  # :meth:`_run` waits for them
            self._local.place_parts = ((time.perf_counter() - asked) * 1e3, 0.0, 0.0)
            try:
                yield a.host, a.plan
            finally:
                self._local.copies_ahead = None
                if a.copies is not None:  # landed, unless the run failed before waiting for them
                    with contextlib.suppress(BackendError):
                        a.copies.finish()
                self._release(m)
            return
        with self._lock:
            locked = time.perf_counter()
            if lane and self.pool.state(m.name) is not Residency.RESIDENT:
                if not fetch:
                    raise NotResidentError(f"{m.name} is not wholly on {self.config.device}: lane {lane} runs "
                                           "resident models only")
                if self._in_flight(m):
                    raise NotResidentError(f"{m.name} is on its way to {self.config.device} in another lane")
            host, plan = self._take_pages(m, value, limit)
        remap, remap_cpu = time.perf_counter(), time.thread_time()
        self._remap_taken(m, plan)
        self._local.place_parts = ((locked - asked) * 1e3, (time.perf_counter() - remap) * 1e3,
                                   (time.thread_time() - remap_cpu) * 1e3)
        try:
            yield host, plan
        finally:
            self._release(m)

    def _take_pages(self, m: _Model, value: Value | None, limit: int | None) -> tuple[HostEntry, PlacementPlan]:
        """Pin the model's host buffer and its pages, taking others' where it needs them (lock held): the
        plan says which slots to remap and load (:meth:`_remap_taken` remaps them)."""
        host = self.store.acquire(m.name)
        try:
            self._pin_host(m, host)
            plan = self._acquire_pages(m, value, limit)
        except BaseException:
            self.store.release(m.name)
            raise
        if plan.remaps:
            m.remapping += 1
        self.stats.remaps += len(plan.remaps)
        self.stats.pages_taken += sum(len(s) for _, s in plan.taken)
        for victim, _slots in plan.taken:
            self._stale[victim] = None
        return host, plan

    @contextlib.contextmanager
    def _at_work(self) -> Iterator[None]:
        """Count a placement or run in progress; once none is, have the stale slots unmapped."""
        with self._lock:
            self._working += 1
        try:
            yield
        finally:
            with self._lock:
                self._working -= 1
                due = not self._working and self._stale and not self._unmap_due
                if due:
                    self._unmap_due = True
                    if self._unmapper is None:
                        self._unmapper = concurrent.futures.ThreadPoolExecutor(
                            1, thread_name_prefix="swapserve-unmapper")
            if due:
                assert self._unmapper is not None
                self._unmapper.submit(self._unmap_idle)

    def _unmap_idle(self) -> None:
        """Unmap the slots whose pages another model took (:attr:`_stale`), model by model, while the device
        is idle, on a thread of the engine's own. Otherwise they stay mapped until their model is placed again,
        which then unmaps each before mapping its new page (a third of a placement's driver calls) — and a
        device of hundreds of models maps every page in many ranges (the driver's remaps stalled longer with
        more, ``bench/remap_stalls.py``). Unmapping beside a placement slowed its remaps (driver calls wait on
        each other: session 22's trace), hence only while none is in progress, after :data:`UNMAP_AFTER_S`; a
        model already begun is finished. A pinned model is skipped (its holder remaps it); a placement of a
        model being unmapped waits for it before mapping (:meth:`_remap_taken`) — holding the gate shared
        first (a capture has the device alone) means that wait never waits on a capture."""
        time.sleep(UNMAP_AFTER_S)
        with self._lock:
            self._unmap_due = False
        while True:
            with self._gate.shared():
                with self._lock:
                    if self._working or not self._stale:
                        return
                    name = next(iter(self._stale))
                    del self._stale[name]
                    m = self._models.get(name)
                    if m is None or not (stale := self.pool.drop_stale(name)):
                        continue
                    m.unmapping += 1
                done = 0
                try:
                    for slot, _page in stale:
                        self.backend.unmap(m.va + slot * self.config.page_bytes)
                        done += 1
                except Exception:  # noqa: BLE001 - the slots left mapped are unmapped by the model's next placement
                    log.warning("unmapping %s's stale slots failed", name, exc_info=True)
                finally:
                    with self._lock:
                        self.pool.restore_stale(name, stale[done:])
                        self.stats.unmapped_behind += done
                        m.unmapping -= 1
                        self._remapped.notify_all()

    def _await_unmapped(self, m: _Model) -> None:
        """Wait (lock held) until no :meth:`_unmap_idle` is unmapping ``m``'s slots."""
        while m.unmapping:
            self._remapped.wait()

    def _remap_taken(self, m: _Model, plan: PlacementPlan) -> None:
        """Remap the slots :meth:`_take_pages` moved (lock not held), then wait until no other holder of the
        model's pins is still remapping its slots; if remapping fails, unpin.

        Two holders can place one model at once — a side lane's fetch and the pages placed ahead for lane 0's
        next run of it, or lane 0's own run — and the second finds the slots the first claimed already its own,
        with nothing to remap: without the wait it copied (or ran) into slots the first was still remapping.
        On the CPU backend that was a segfault; on an H200 in session 19's trace, most likely the
        ``unspecified launch failure`` that ended the worker's CUDA context (a side lane's fetch of a resnet50
        remapping for 1.06 ms while its pages were placed ahead for lane 0)."""
        if plan.remaps and m.unmapping:  # its stale slots are being unmapped (:meth:`_unmap_idle`): not onto them
            with self._lock:
                self._await_unmapped(m)
        try:
            self._remap(m, plan)
        except BaseException:
            self._remapped_by(m, plan)
            self._release(m)
            raise
        self._remapped_by(m, plan, wait=True)

    def _remapped_by(self, m: _Model, plan: PlacementPlan, wait: bool = False) -> None:
        """``plan``'s remaps are over (done or failed); with ``wait``, also every other holder's."""
        if not plan.remaps and not m.remapping:  # a resident run: nothing to count or wait for (read without the lock:
            return                               # a holder that starts remapping after this has its own slots)
        with self._lock:
            if plan.remaps:
                m.remapping -= 1
                self._remapped.notify_all()
            while wait and m.remapping:
                self._remapped.wait()

    def _acquire_pages(self, m: _Model, value: Value | None, limit: int | None) -> PlacementPlan:
        """``pool.acquire`` (lock held), waiting while the pages it needs are pinned by a run in another lane:
        that run ends within milliseconds, and the scheduler, which does not track pins, sent this swap
        expecting the pages (a side lane's run pinning most of a small pool made such swaps fail with 503).
        Gives up after :data:`PLACE_WAIT_S`."""
        give_up = time.monotonic() + PLACE_WAIT_S
        while True:
            try:
                return self.pool.acquire(m.name, self.clock(), value, limit)
            except PoolBusyError:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise
                self._unpinned.wait(left)

    def _run(self, m: _Model, host: HostEntry, plan: PlacementPlan, inputs: list[torch.Tensor],
             batch: int, ln: _Lane, exclusive: bool, peer: PeerSource | None = None,
             launched: Callable[[], None] | None = None,
             emit: Callable[[list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Launch on the lane's stream (and ``emit`` the outputs there), then wait once for it; pages count as
        loaded only once their copies landed."""
        assert host.buffer is not None
        copy = self._copy_mask(m, plan.load)
        launch = copy  # what this launch copies
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        ahead: Waiter | None = self._local.copies_ahead
        if ahead is not None:  # started with the placing ahead: the run waits for them, on the device
            ahead.wait(len(m.chunks) - 1)
            launch = [False] * len(copy)
        from_peer = False
        if plan.load and peer is not None:  # from a peer's pages: the bytes first, then a resident model's run
            with self._peer_copies:  # launched before they can be unmapped (drop_peer waits for them to land)
                from_peer = self.backend.has_peer(peer.device)
                if from_peer:
                    self.backend.fetch_peer(m.va, peer.device, peer.pages, m.chunks, copy)
        if plan.load and (ln.index or peer is not None) and not from_peer:
            # A side lane's fetch: likewise, from host; so is a run whose lender's worker died after it was sent
            # (its pages unmapped here since).
            self.backend.fetch(m.va, host.buffer, m.chunks, copy)
        piped = bool(plan.load) and not ln.index and peer is None and ahead is None
        if self.mode == "graph" and batch not in m.graphs:
            if not exclusive:
                raise _NeedsCapture
            outs = self._first_run_graph(m, host, plan, launch, inputs, batch, ln.index)
        elif self.mode == "graph":
            graphs = m.graphs[batch]
            if piped and graphs.swap_host_ptr != host.buffer.data_ptr():
                if not exclusive:
                    raise _NeedsCapture
                graphs.capture_swap(m.va, host.buffer, m.chunks, m.events)
            outs = graphs.replay(inputs, copy if piped else None, ln.index)
        elif not piped:
            with torch.no_grad():
                outs = m.program.run(inputs)
        elif self.mode == "ondemand":
            outs = self._load_then_run(m, host, plan, inputs)
        else:
            outs = self._swap_eager(m, host, copy, inputs)
        cpu = time.thread_time() - cpu0
        failed: BaseException | None = None
        if emit is not None:
            try:
                emit(outs)
            except BaseException as e:  # noqa: BLE001 - raised below, once what was launched has landed
                failed = e
        if launched is not None:
            launched()
        self.backend.synchronize(ln.stream)
        self._landed(m, plan, copy, from_peer=from_peer)
        with self._lock:
            self._count(plan, time.perf_counter() - wall0, cpu)
        if failed is not None:
            raise failed
        return outs

    def _load_then_run(self, m: _Model, host: HostEntry, plan: PlacementPlan,
                       inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The on-demand baseline: tensor by tensor from pageable memory, synchronously, then run."""
        assert host.buffer is not None
        page = self.config.page_bytes
        load = set(plan.load)
        with torch.no_grad():
            dev = self.backend.view(m.va, m.layout.nbytes)
            for s in m.layout.slots:
                if s.nbytes and (s.offset // page in load or (s.offset + s.nbytes - 1) // page in load):
                    dev[s.offset:s.offset + s.nbytes].copy_(host.buffer[s.offset:s.offset + s.nbytes])
            return m.program.run(inputs)

    def _swap_eager(self, m: _Model, host: HostEntry, copy: list[bool], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        assert host.buffer is not None
        with torch.no_grad():
            waiter = self.backend.start_copies(m.va, host.buffer, m.chunks, copy, m.events)
            try:
                return m.program.run(inputs, waiter)
            finally:
                waiter.finish()  # the copies land (or fail, raising) whatever the compute did

    def _first_run_graph(self, m: _Model, host: HostEntry, plan: PlacementPlan, copy: list[bool],
                         inputs: list[torch.Tensor], batch: int, lane: int) -> list[torch.Tensor]:
        """First run at this batch size: swap in eagerly (also the warm-up), capture, answer from the graph."""
        from swapserve.engine.graphs import ModelGraphs

        if plan.load:
            self._swap_eager(m, host, copy, inputs)
        else:
            with torch.no_grad():
                m.program.run(inputs)
        assert host.buffer is not None and isinstance(m.events, list)
        graphs = ModelGraphs(self.backend, m.program, self.lanes)  # type: ignore[arg-type]
        before = [self._workspace_bytes(ln) for ln in self.lanes]
        with torch.no_grad():
            graphs.capture(inputs, m.va, host.buffer, m.chunks, m.events)
        for ln, was in zip(self.lanes, before):
            used = self._workspace_bytes(ln)
            if used > self.config.workspace_bytes:
                raise WorkspaceError(
                    f"{m.name} at batch {batch} needs more activation memory than the workspace holds "
                    f"({used / 2**20:.0f} MiB in use after capture in lane {ln.index}, "
                    f"{self.config.workspace_bytes / 2**20:.0f} MiB configured); raise workspace_bytes or lower the batch")
            if used > was:
                log.info("lane %d's workspace grew by %d bytes while capturing %s (batch %d)", ln.index, used - was,
                         m.name, batch)
        m.graphs[batch] = graphs
        return graphs.replay(inputs, None, lane)

    # --- helpers ------------------------------------------------------------------------------

    def _get(self, name: str) -> _Model:
        try:
            return self._models[name]
        except KeyError:
            raise NotFoundError(f"no model {name!r} on {self.config.device}") from None

    def _check_inputs(self, m: _Model, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        specs = m.artifact.manifest.inputs
        if len(inputs) != len(specs):
            raise InvalidInputError(f"{m.name} takes {len(specs)} inputs ({', '.join(s.name for s in specs)}), "
                                    f"got {len(inputs)}")
        batch = None
        out = []
        for spec, x in zip(specs, inputs):
            if not isinstance(x, torch.Tensor):
                raise InvalidInputError(f"input {spec.name!r} of {m.name} must be a tensor")
            want = dtype_from_name(spec.dtype)
            if x.dtype != want:
                raise InvalidInputError(f"input {spec.name!r} of {m.name} must be {spec.dtype}, got "
                                        f"{str(x.dtype).removeprefix('torch.')}")
            shape = tuple(x.shape)
            ok, batch = fits_shape(shape, spec.shape, m.artifact.manifest.max_batch, batch)
            if not ok:
                raise InvalidInputError(f"input {spec.name!r} of {m.name} must have shape "
                                        f"{_shape_text(spec.shape)} (batch ≤ {m.artifact.manifest.max_batch}), "
                                        f"got {list(shape)}")
            if (why := spec.index_error(x)) is not None:  # on a GPU a device-side assert would end the context
                raise InvalidInputError(f"input {spec.name!r} of {m.name}: {why}")
            out.append(x)
        return out, batch or (int(inputs[0].shape[0]) if inputs[0].dim() else 1)

    def _check_workspace(self, m: _Model, batch: int) -> None:
        need = self.activation_bytes(m.name, batch)
        if need is not None and need > self.config.workspace_bytes:
            raise WorkspaceError(f"{m.name} at batch {batch} needs about {need / 2**20:.0f} MiB of activations, more "
                                 f"than the device workspace ({self.config.workspace_bytes / 2**20:.0f} MiB); raise "
                                 "workspace_bytes or lower the batch")

    def _pin_host(self, m: _Model, host: HostEntry) -> None:
        assert host.buffer is not None
        if self.mode == "ondemand":
            return  # the baseline copies from pageable memory
        if m.pinned_ptr != host.buffer.data_ptr():
            self.backend.pin(host.buffer)
            m.pinned_ptr = host.buffer.data_ptr()

    def _on_spill(self, entry: HostEntry) -> None:
        m = self._models.get(entry.key)
        if m is not None and m.pinned_ptr and entry.buffer is not None:
            self.backend.unpin(entry.buffer)
            m.pinned_ptr = 0

    def _remap(self, m: _Model, plan: PlacementPlan) -> None:
        page = self.config.page_bytes
        for r in plan.remaps:
            va = m.va + r.slot * page
            if r.old_page is not None:
                self.backend.unmap(va)
            self.backend.map(va, r.new_page)

    def _copy_mask(self, m: _Model, load: Sequence[int]) -> list[bool]:
        page = self.config.page_bytes
        want = set(load)
        return [c.start // page in want for c in m.chunks]

    def _landed(self, m: _Model, plan: PlacementPlan, copy: list[bool], from_peer: bool = False) -> int:
        """The plan's copies landed: its pages count as loaded, and the calling thread's :meth:`last_run`
        says what it did. Returns the bytes copied."""
        copied = sum(c.nbytes for c, k in zip(m.chunks, copy) if k) if plan.load else 0
        with self._lock:
            self.pool.loaded(m.name, plan.load)
            self.stats.bytes_copied += copied
        self._local.last_run = RunInfo(bool(plan.load), copied, len(plan.taken), from_peer,
                                       len(plan.remaps), sum(r.old_page is not None for r in plan.remaps))
        return copied

    def _count(self, plan: PlacementPlan, wall: float, cpu: float) -> None:
        """Count a finished run."""
        s = self.stats
        s.runs += 1
        if not plan.load:
            s.resident_runs += 1
            return
        s.swaps += 1
        s.swap_seconds.append(wall)
        s.swap_cpu_seconds.append(cpu)
        del s.swap_seconds[:-1000], s.swap_cpu_seconds[:-1000]

    def _reserve_workspace(self, stream: object) -> object:
        """Take a lane's activation workspace once, at start, as a private pool its graphs share."""
        pool = torch.cuda.MemPool()
        small = min(64 << 20, self.config.workspace_bytes // 8)
        # The caching allocator reuses a free block only on the stream that allocated it: reserve on
        # the lane's stream, where its graphs are captured. Blocks of <= 1 MiB come from 2 MiB segments
        # of their own, so some of those are reserved too.
        with torch.cuda.use_mem_pool(pool), torch.cuda.stream(stream):  # type: ignore[arg-type]
            big = torch.empty(self.config.workspace_bytes - small, dtype=torch.uint8, device=self.backend.device)
            smalls = [torch.empty(1 << 20, dtype=torch.uint8, device=self.backend.device) for _ in range(small >> 20)]
        del big, smalls
        return pool

    @staticmethod
    def _workspace_bytes(lane: _Lane) -> int:
        assert lane.workspace is not None
        return sum(seg["total_size"] for seg in lane.workspace.snapshot())  # type: ignore[attr-defined]

    def close(self) -> None:
        for pool in (self._placer, self._unmapper):
            if pool is not None:
                pool.shutdown(wait=True)
        with self._lock:
            for name in list(self._models):
                self.remove(name)
            self.backend.close()


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("batch" if d == -1 else str(d) for d in shape) + "]"
