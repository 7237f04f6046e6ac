"""The request path of a node: a model entity's request goes to the scheduler's queues, what the scheduler
decides goes to the workers (inputs through each worker's IO slab), and the workers' replies answer the
requests — all on the controller's event loop, with no task per run (replies call back).

:class:`Dispatcher` owns what is in flight; :class:`swapserve.node.controller.Node` owns what is deployed
(functions, models, workers' lifecycle) and hands it the maps it reads.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from swapserve.engine import HostStore
from swapserve.errors import BackendError, OverloadedError, SwapserveError, UnavailableError
from swapserve.metrics import Metrics
from swapserve.node import workers as wk
from swapserve.node.api import InferResult
from swapserve.node.messages import Lend, Lent, Prefetch, Reply, Run, RunResult, TensorRef, Unlend
from swapserve.node.runlog import CPU_SAMPLE_MS, STALL_MS, RunLog, RunRecord, Stall
from swapserve.node.slab import Slab, ref_nbytes
from swapserve.scheduler.core import Scheduler
from swapserve.scheduler.types import Decision, Dispatch, NodeState, Request


OFF_LOOP_COPY_BYTES = 1 << 20
"""A run whose outputs exceed this has them written to a block of the slab's answers part and answered from there
(:mod:`swapserve.node.answers`); where none is free, or its requests' outputs go to sinks, they are copied out
of the IO slab on threads (the copy releases the GIL), not on the event loop every request shares: GPT-2's
12.9 MB of logits held it for milliseconds."""
COPY_THREADS = 4
"""Threads copying large outputs out of the IO slabs, in pieces of at least ``COPY_PIECE_BYTES`` side by side:
one thread (this process runs torch with one intra-op thread) took ~28 ms for a batch of four GPT-2 answers
(52 MB) on the H200 host, longer than the run itself."""
COPY_PIECE_BYTES = 4 << 20


ARRIVAL_TURNS = 2
"""Turns of the event loop an arrival's decision waits, so that the requests of a burst that reached the node
together are all queued when it is taken and leave in one batch. At CV 2 one request in seven comes within
10 ms of the one before of its function, many within 20 µs (two sends of one client): decided at once, the
first went alone and the second waited for its run, swap included. Under uvloop a request read while another's
handler runs has its handler run in the next turn (reads come after the ready callbacks in a turn): two turns
let it join. A turn of a loop with nothing else ready takes microseconds."""

PREFETCH_WANTED_S = 1.0
"""How long a prefetch that found every first lane busy is retried (as runs end) before it is dropped."""


def value_changes(held: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """What a receiver holding ``held`` needs to hold ``values`` (an absent entry counting 0.0): the entries
    that differ, and 0.0 for those ``values`` lacks; ``held`` becomes ``values``. Set operations on the dicts'
    views, not a loop: tables of hundreds of entries that mostly agree."""
    changed = values.items() - held.items()
    gone = held.keys() - values.keys()
    held.update(changed)
    for k in gone:
        del held[k]
    out = dict(changed)
    out.update(dict.fromkeys(gone, 0.0))
    return out


def copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dest, src in copies:
        dest.copy_(src)


def _pieces(copies: list[tuple[torch.Tensor, torch.Tensor]], parts: int,
            min_bytes: int = COPY_PIECE_BYTES) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``copies`` as up to ``parts`` lists of about equal bytes, large contiguous tensors cut into flat pieces of
    at least ``min_bytes``."""
    flat: list[tuple[torch.Tensor, torch.Tensor]] = []
    total = sum(d.numel() * d.element_size() for d, _ in copies)
    piece = max(min_bytes, -(-total // parts))
    for dest, src in copies:
        if not (dest.is_contiguous() and src.is_contiguous()):  # (a slab's rows and fresh memory always are)
            flat.append((dest, src))
            continue
        d, s = dest.view(-1), src.view(-1)
        step = max(1, piece // max(1, d.element_size()))
        flat += [(d[i:i + step], s[i:i + step]) for i in range(0, d.numel(), step)] or [(dest, src)]
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(min(parts, len(flat)))]
    loads = [0] * len(out)
    for d, s in sorted(flat, key=lambda c: -c[0].numel() * c[0].element_size()):  # largest first, to the least loaded
        k = loads.index(min(loads))
        out[k].append((d, s))
        loads[k] += d.numel() * d.element_size()
    return out


class OutputSink(Protocol):
    """Where one request's outputs go when they leave the IO slab — memory they are bound for anyway (an HTTP
    front's shared arena) — so that they are copied once, not into a private tensor and again from there."""

    def place(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """Memory shaped and typed as ``like`` for output ``name``, or None: a private copy is made."""
        ...

    def discard(self) -> None:
        """The request will not be answered (its caller gave up): take back what :meth:`place` gave."""
        ...


def _spans(fl: _InFlight) -> list[tuple[int, int]]:
    """(first row, rows) of each of a run's requests in its outputs, in order."""
    spans, row = [], 0
    for p in fl.pending:
        spans.append((row, p.request.items))
        row += p.request.items
    return spans


def _rows(fl: _InFlight, outs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each request's rows of the run's outputs (views of them)."""
    return [{name: o[row:row + n] if o.dim() else o for name, o in zip(fl.outputs, outs)} for row, n in _spans(fl)]


def _owned_rows(fl: _InFlight, slab: Slab, refs: Sequence[TensorRef]) -> list[dict[str, torch.Tensor]]:
    """Each request's rows of the run's outputs, copied out of the slab into memory of their own (:meth:`_rows`
    and :meth:`_answers` without a sink, in one copy)."""
    return [{name: slab.rows(r, row, n) for name, r in zip(fl.outputs, refs)} for row, n in _spans(fl)]


def _answers(fl: _InFlight, outs: list[torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]],
                                                              list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each request's outputs — its rows of the run's — in memory of their own (where its sink says, else new),
    and the copies that fill them from ``outs``."""
    answers, copies = [], []
    for p, rows in zip(fl.pending, _rows(fl, outs)):
        result = {}
        for name, src in rows.items():
            dest = p.sink.place(name, src) if p.sink is not None and not p.future.done() else None
            result[name] = dest if dest is not None else torch.empty_like(src)
            copies.append((result[name], src))
        answers.append(result)
    return answers, copies


class Served(Protocol):
    """What the dispatcher needs of a serving model entity."""

    key: str
    """Host-store / worker key of the loaded version."""
    outputs: tuple[str, ...]

    def answer_bytes(self, items: int) -> int:
        """The bytes a run of ``items`` rows writes into the IO slab (its declared outputs)."""
        ...


@dataclass
class _Pending:
    request: Request
    inputs: list[torch.Tensor]
    future: asyncio.Future[InferResult]
    started: float
    due: float
    """When its SLO ends (its request's deadline may be earlier: the gateway's margin)."""
    sink: OutputSink | None = None


@dataclass
class _InFlight:
    dispatch: Dispatch
    key: str
    pending: list[_Pending]
    started: float
    """The scheduling pass that dispatched it."""
    batch: int
    outputs: tuple[str, ...]
    """The serving version's output names at dispatch (a delete or redeploy may land meanwhile)."""
    sent: float
    """When its message was handed to the pipe (before pickling and the write)."""
    region: int
    """Its part of the worker's IO slab (-1: none, a copy with no run)."""
    answers_at: int = -1
    """The block of the slab's answers part its outputs are written to (-1: none, its region)."""
    begun: float = 0.0
    """When its lane took it up: ``started``, or the end of the run it was queued behind."""
    deferred: Callable[[], None] | None = None
    """Its answer, held while a run ahead of it in the same lane is still being answered."""
    unsent: Run | Prefetch | None = None
    """Its message, held until the run ahead of it in the lane is sent (a lane's runs are sent in order)."""
    lending: bool = False
    """Waiting for the device its model is copied from to lend it (then sent)."""
    lent_from: int = -1
    """The device that lent the model, which the run copies it from (-1: from host)."""
    decide_ms: float = 0.0
    """The decision of the scheduling pass that dispatched it (:attr:`InferResult.decide_ms`)."""
    piped_at: float = 0.0
    read_at: float = 0.0
    """``time.perf_counter()`` when its message went into the worker's pipe and when its reply was taken up
    (the worker stamps its side on the same clock: :attr:`RunResult.received_at`)."""


class Dispatcher:
    def __init__(self, state: NodeState, scheduler: Scheduler, workers: list[wk.WorkerHandle], store: HostStore,
                 models: Mapping[str, Served], entities: Mapping[str, str], metrics: Metrics,
                 clock: Callable[[], float], on_released: Callable[[str], None], devices: int,
                 lanes: int = 1):
        """``workers``, ``models`` (serving entities by name) and ``entities`` (their names by model key) are
        the node's own, read as they change;
        ``on_released(key)`` is called when the last run using a model version's key ends; ``lanes`` is the
        workers' lanes per device (each with its region of the worker's IO slab, and the first lane with a
        second one for a run queued behind it when the scheduler queues ahead)."""
        self.state = state
        self.scheduler = scheduler
        self._workers = workers
        self.store = store
        self._models = models
        self._entities = entities
        self.metrics = metrics
        self.clock = clock
        self._on_released = on_released
        self.live = True
        self._pending: dict[str, _Pending] = {}
        self._lanes = lanes
        self._regions = lanes + (1 if scheduler.queue_ahead else 0)
        self._inflight: dict[tuple[int, int], list[_InFlight]] = {}
        """By (device, lane), in the order sent (the worker runs a lane's messages in that order)."""
        self._sent_values: dict[int, dict[str, float]] = {}
        """By device, the eviction values (by function) its worker holds from the messages sent it
        (:meth:`_values`)."""
        self._key_users: dict[str, int] = {}
        self._copier: ThreadPoolExecutor | None = None
        self._wanted: dict[str, float] = {}
        """Prefetches that found no idle lane: entity → when asked for (retried as runs end)."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._arrivals: asyncio.Handle | None = None
        """The decision an arrival asked for (:meth:`_decide_soon`), while it waits its turns."""
        self._refresh: asyncio.Handle | None = None
        """The eviction values' computation a pass asked for once its dispatches were sent (:meth:`pump`)."""
        self._hot_until = 0.0
        self._spinning = False
        self._spun_at = 0.0
        """When the polling last ran (:meth:`_spin`): a turn of the loop that began there and took :data:`STALL_MS`
        or more is kept as a stall."""
        self._cpu_at = (0.0, 0.0)
        """When the polling last read its thread's CPU time, and what it read (s)."""
        self._ids = itertools.count()
        self.busy_s = [0.0] * devices
        """Seconds each device spent on runs (dispatch to reply), summed over its lanes."""
        self.runs = RunLog()
        """What the lanes ran lately (``GET /api/v1/runs``)."""

    def users(self, key: str) -> int:
        """Runs in flight that use model version ``key``."""
        return self._key_users.get(key, 0)

    def busy(self, device: int) -> bool:
        return any(self._inflight.get((device, lane)) for lane in range(self._lanes))

    async def drain(self, deadline: float) -> None:
        """Wait for the runs in flight to end (until ``deadline`` on the node's clock)."""
        while any(self._inflight.values()) and self.clock() < deadline:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the output-copying thread (after the runs in flight ended or were given up)."""
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None

    def fail_all(self, error: SwapserveError) -> None:
        """Fail every request still waiting."""
        for p in list(self._pending.values()):
            self._fail(p, error)

    async def run(self, entity: str, tensors: list[torch.Tensor], items: int, now: float, deadline: float,
                  request_id: str | None, sink: OutputSink | None = None, due: float | None = None) -> InferResult:
        """Queue one request of a model entity and wait for its outputs (written where ``sink`` says, if given).
        ``deadline``: what the scheduler plans to; ``due``: when the request's SLO ends (default: the deadline),
        which ``slo_misses`` counts against."""
        req = Request(request_id or f"r{next(self._ids)}", entity, now, deadline, items)
        if req.id in self._pending:  # a client reused an id while its first request is still queued
            req.id = f"{req.id}-{next(self._ids)}"
        reject = self.scheduler.admit(self.state, req, now)
        if reject is not None:
            self.metrics.count_slo_miss(entity)
            raise OverloadedError(reject.reason, reject.retry_after, reject.status)
        fut: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = _Pending(req, tensors, fut, now, deadline if due is None else due, sink)
        self._decide_soon()
        self._keep_hot()
        try:
            return await fut
        except asyncio.CancelledError:
            self._pending.pop(req.id, None)
            q = self.state.queues.get(entity)
            if q is not None:
                q.requests = [r for r in q.requests if r.id != req.id]
            raise

    def pump(self) -> None:
        """Ask the scheduler what to do now and do it."""
        if not self.live:
            return
        if not self._pending:  # nothing queued: nothing to decide (the common case after a completion)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        now = self.clock()
        decision = self.scheduler.decide(self.state, now)
        self.scheduler.apply(self.state, decision, now)  # dequeue, mark devices busy
        decide_ms = (self.clock() - now) * 1e3
        for rej in decision.rejects:
            p = self._pending.pop(rej.request_id, None)
            if p is not None:
                self.metrics.count_slo_miss(p.request.function)
                self._fail(p, OverloadedError(rej.reason, rej.retry_after, rej.status))
        for d in decision.dispatches:
            self._dispatch(d, now, decide_ms)
        self._arm_timer(now)
        if self._refresh is None:  # after what is ready now (the answers going out), off the request path
            self._refresh = asyncio.get_running_loop().call_soon(self._refresh_values)

    def _refresh_values(self) -> None:
        self._refresh = None
        if self.live and self.scheduler.refresh_values(self.state, self.clock()):  # a slice: the next one later
            self._refresh = asyncio.get_running_loop().call_soon(self._refresh_values)

    def _decide_soon(self) -> None:
        """:meth:`pump` in :data:`ARRIVAL_TURNS` turns of the event loop, once for all the arrivals meanwhile."""
        if self._arrivals is None:
            self._arrivals = asyncio.get_running_loop().call_soon(self._turn, ARRIVAL_TURNS - 1)

    def _turn(self, left: int) -> None:
        if left:
            self._arrivals = asyncio.get_running_loop().call_soon(self._turn, left - 1)
        else:
            self._arrivals = None
            self.pump()

    def prefetch(self, entity: str) -> None:
        """Copy a model entity's weights onto a device ahead of its requests (see :meth:`Scheduler.prefetch`):
        now if a device's first lane is idle, else after the runs in flight, while it is still wanted (for
        :data:`PREFETCH_WANTED_S`). Requests always go first."""
        if not self._start_prefetch(entity):
            self._wanted[entity] = self.clock()

    def _retry_prefetches(self) -> None:
        now = self.clock()
        for entity, since in list(self._wanted.items()):
            if now - since > PREFETCH_WANTED_S or self._start_prefetch(entity):
                del self._wanted[entity]

    def _start_prefetch(self, entity: str) -> bool:
        m = self._models.get(entity)
        if not self.live or m is None:
            return False
        now = self.clock()
        d = self.scheduler.prefetch(self.state, entity, now)
        if d is None:
            return False
        self.scheduler.apply(self.state, Decision((d,)), now)
        self.metrics.count_prefetch(self._workers[d.device].device)
        self._copy_in(d, m, now)
        return True

    def _copy_in(self, d: Dispatch, m: Served, now: float) -> None:
        """Send a copy with no run: a whole prefetch, or a piece of a swap (``d.piece_bytes``)."""
        self.store.acquire(m.key)  # pinned in host memory until the copy ends
        self._launch(d, m, Prefetch(wk.next_id(), m.key, self._values(d), d.piece_bytes or None), [], 0, now)

    def _dispatch(self, d: Dispatch, now: float, decide_ms: float) -> None:
        m = self._models.get(d.function)
        if d.piece_bytes:
            if m is None:  # deleted since it was queued: its requests fail with the queue
                self.state.devices[d.device].release(d.lane, now, queued=self._behind(d))
            else:
                self.metrics.count_swap_piece(self._workers[d.device].device)
                self._copy_in(d, m, now)
            return
        batch = [p for rid in d.request_ids if (p := self._pending.pop(rid, None)) is not None and not p.future.done()]
        w = self._workers[d.device]
        dev = self.state.devices[d.device]
        try:
            if not batch or m is None:
                raise UnavailableError(f"function {d.function!r} is gone")
            self.store.acquire(m.key)  # pinned in host memory until the run ends
            region = self._region(d)
            start, limit = w.slab.region(region, self._regions)
            try:
                refs, end = w.slab.write_batch([[p.inputs[i] for p in batch] for i in range(len(batch[0].inputs))],
                                               start, limit)
            except BaseException:
                self.store.release(m.key)
                raise
        except SwapserveError as e:
            dev.release(d.lane, now, queued=self._behind(d))
            for p in batch:
                self._fail(p, e)
            return
        # A side lane may fetch even a model the scheduler saw resident: a swap in the first lane may have
        # evicted it since (the worker reports residency with its replies), and fetching beats waiting for
        # that swap to end (the worker hands the run to the first lane only if the model is in flight there).
        fetch = bool(d.lane) and self.scheduler.may_fetch(self.state, d.function)
        items = sum(p.request.items for p in batch)
        block, size = self._answers_block(w, m, batch, items)
        run = Run(wk.next_id(), m.key, refs, end, self._values(d), d.lane, limit, fetch,
                  place_ahead=self.scheduler.place_ahead and not d.lane, spin_s=self.scheduler.spin_ms / 1e3)
        if block >= 0:
            run = replace(run, out_offset=block, out_limit=block + size, out_fallback=(end, limit))
        if d.source == "peer" and d.peer is not None and not self._workers[d.peer].dead:
            self._lend(self._launch(d, m, run, batch, items, now, region, lend=True, answers_at=block,
                                    decide_ms=decide_ms), d.peer)
        else:
            self._launch(d, m, run, batch, items, now, region, answers_at=block, decide_ms=decide_ms)
        for p in batch:  # once the run is on its way
            self.metrics.observe_queue(d.function, now - p.started)

    @staticmethod
    def _answers_block(w: wk.WorkerHandle, m: Served, batch: list[_Pending], items: int) -> tuple[int, int]:
        """A block of the worker's answers part for a run's large outputs, and its size; (-1, 0) for outputs
        small enough to copy (:data:`OFF_LOOP_COPY_BYTES`), for requests whose outputs go to a sink anyway, or
        when no block is free (then copied out of the region, as small ones are)."""
        size = m.answer_bytes(items)
        if size <= OFF_LOOP_COPY_BYTES or any(p.sink is not None for p in batch):
            return -1, 0
        block = w.slab.answers.take(size)
        return (-1, 0) if block is None else (block, size)

    def _lend(self, fl: _InFlight, peer: int) -> None:
        """Ask ``peer`` to lend ``fl``'s model (pin it whole and say where its pages are); the run goes out with
        the answer — from host memory if the peer no longer holds it whole."""
        try:
            wk.send(self._workers[peer], Lend(wk.next_id(), fl.key), functools.partial(self._lent, fl, peer))
        except (BackendError, OSError) as e:
            self._lent(fl, peer, e)

    def _lent(self, fl: _InFlight, peer: int, outcome: Any) -> None:
        lent = outcome.result if isinstance(outcome, Reply) and outcome.ok else None
        fl.lending = False
        if isinstance(lent, Lent) and lent.pages is not None and isinstance(fl.unsent, Run):
            fl.lent_from = peer
            fl.unsent = replace(fl.unsent, peer=peer, peer_pages=lent.pages)
        d = fl.dispatch
        w = self._workers[d.device]
        for f in list(self._inflight.get((d.device, d.lane), ())):  # it, and what queued behind it meanwhile
            if f.lending:
                break
            if f.unsent is not None:
                msg, f.unsent = f.unsent, None
                self._send(w, f, msg)

    def _unlend(self, fl: _InFlight) -> None:
        """The run that copied from a lender ended: it may let its pages go."""
        src = self._workers[fl.lent_from]
        if not src.dead:
            try:
                wk.send(src, Unlend(wk.next_id(), fl.key), _ignore)
            except (BackendError, OSError):
                pass  # gone: its pins went with it

    def _behind(self, d: Dispatch) -> bool:
        """Whether ``d`` goes behind a run in flight in its lane (the first lane, queued ahead)."""
        return not d.lane and bool(self._inflight.get((d.device, 0)))

    def _region(self, d: Dispatch) -> int:
        """The IO slab region for ``d``'s inputs and outputs: its lane's, or for the first lane the one the
        run in flight there does not use."""
        if d.lane:
            return d.lane
        used = {fl.region for fl in self._inflight.get((d.device, 0), ())}
        return self._lanes if 0 in used and self._regions > self._lanes else 0

    def _values(self, d: Dispatch) -> dict[str, float]:
        """What of a dispatch's eviction values its worker does not hold yet, by model key (0.0 for a function
        valued there no longer, as one never sent counts); from now on it holds them. Between the scheduler's
        whole computations (``VALUE_REUSE_S``) only the functions touched or turned hot change: a swap carried
        the whole table before, hundreds of models pickled and unpickled with each (~0.13 ms on the CI box for
        360, beside ~0.05 ms to key them), more than its decision."""
        if not d.values:  # a resident run evicts nothing
            return {}
        models = self._models
        changes = value_changes(self._sent_values.setdefault(d.device, {}), d.values)
        return {models[f].key: v for f, v in changes.items() if f in models}

    def _launch(self, d: Dispatch, m: Served, msg: Run | Prefetch, batch: list[_Pending], items: int,
                now: float, region: int = -1, lend: bool = False, answers_at: int = -1,
                decide_ms: float = 0.0) -> _InFlight:
        """Send a run or prefetch to its lane (held while its model is being lent, ``lend``, or while a run
        ahead of it in the lane is held); its reply (or the worker's failure) completes it."""
        w = self._workers[d.device]
        self._key_users[m.key] = self._key_users.get(m.key, 0) + 1
        queue = self._inflight.setdefault((d.device, d.lane), [])
        if queue:
            self.metrics.count_queued_ahead(w.device)
        fl = _InFlight(d, m.key, batch, now, items, m.outputs, self.clock(), region, answers_at, begun=now,
                       lending=lend, decide_ms=decide_ms)
        held = lend or any(f.unsent is not None for f in queue)
        queue.append(fl)
        if held:
            fl.unsent = msg
        else:
            self._send(w, fl, msg)
        return fl

    def _send(self, w: wk.WorkerHandle, fl: _InFlight, msg: Run | Prefetch) -> None:
        fl.piped_at = time.perf_counter()
        try:
            wk.send(w, msg, functools.partial(self._complete, w, fl))
        except (BackendError, OSError) as e:
            self._complete(w, fl, e if isinstance(e, BackendError) else BackendError(str(e)))

    def _complete(self, w: wk.WorkerHandle, fl: _InFlight, outcome: Any) -> None:
        """A run ended (called straight from the worker's reply). Outputs written to a block of the answers part
        are answered from there; large ones in the lane's slab region are first copied out on a thread (the lane
        stays busy meanwhile: the region is still being read)."""
        fl.read_at = time.perf_counter()
        if fl.lent_from >= 0:
            self._unlend(fl)
        ok = not isinstance(outcome, BaseException) and outcome.ok and isinstance(outcome.result, RunResult)
        if fl.answers_at >= 0:
            refs = outcome.result.outputs if ok else ()
            if refs and all(r.offset >= fl.answers_at for r in refs):
                self._finish(w, fl, outcome, [], _rows(fl, w.slab.answers.views(fl.answers_at, refs)))
                return
            w.slab.answers.give(fl.answers_at)  # failed, or written to the region (outputs over their declared size)
        if not ok:
            self._finish(w, fl, outcome, [], None)
            return
        refs = outcome.result.outputs
        if sum(ref_nbytes(r) for r in refs) <= OFF_LOOP_COPY_BYTES:
            if any(p.sink is not None for p in fl.pending):
                self._finish(w, fl, outcome, [w.slab.tensor(r) for r in refs], None)  # copied into the sinks
            else:
                self._finish(w, fl, outcome, [], _owned_rows(fl, w.slab, refs))
            return
        outs = [w.slab.tensor(r) for r in refs]
        if self._copier is None:
            self._copier = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="swapserve-outputs")
        answers, copies = _answers(fl, outs)
        copied = asyncio.gather(*(asyncio.wrap_future(self._copier.submit(copy_all, part))
                                  for part in _pieces(copies, COPY_THREADS)), return_exceptions=True)  # all ended
        copied.add_done_callback(functools.partial(self._copied, w, fl, outcome, answers))

    def _copied(self, w: wk.WorkerHandle, fl: _InFlight, outcome: Any, answers: list[dict[str, torch.Tensor]],
                copied: asyncio.Future[Any]) -> None:
        failed = next((e for e in copied.result() if isinstance(e, BaseException)), None)
        if failed is not None:  # the requests fail (their placed memory given back), the node goes on
            for p in fl.pending:
                if p.sink is not None:
                    p.sink.discard()
            self._finish(w, fl, BackendError(f"copying the outputs out of the IO slab failed: {failed}"), [], None)
            return
        self._finish(w, fl, outcome, [], answers)

    def _finish(self, w: wk.WorkerHandle, fl: _InFlight, outcome: Any, outs: list[torch.Tensor],
                answers: list[dict[str, torch.Tensor]] | None) -> None:
        """Answer a finished run's requests — with ``answers`` (copied out of the slab already), or copied here
        from ``outs`` (views of its slab region) — and free its place in the lane. Runs of one lane are
        answered in the order they were sent: one whose reply overtook the answer of the run ahead of it (still
        copying large outputs, say) waits for that answer."""
        lane = fl.dispatch.lane
        queue = self._inflight[w.index, lane]
        if queue[0] is not fl:
            fl.deferred = functools.partial(self._finish, w, fl, outcome, outs, answers)
            return
        queue.pop(0)
        reply = None if isinstance(outcome, BaseException) else outcome
        error: SwapserveError | None = outcome if isinstance(outcome, SwapserveError) else None
        fn_name = fl.dispatch.function
        now = self.clock()
        dev = self.state.devices[w.index]
        dev.release(lane, now)
        dev.last_used[fn_name] = now
        self.state.touch(fn_name)
        self.busy_s[w.index] += now - fl.begun
        if queue:
            queue[0].begun = max(queue[0].begun, now)
        self.store.release(fl.key)
        self._key_users[fl.key] -= 1
        if reply is not None and reply.ok and isinstance(reply.result, RunResult):
            res = reply.result
            if answers is None:  # views of the slab: the next run of this lane overwrites it
                answers, copies = _answers(fl, outs)
                copy_all(copies)
            answer_ms = (time.perf_counter() - res.answered_at) * 1e3
            for p, result in zip(fl.pending, answers):
                if not p.future.done():
                    p.future.set_result(InferResult(result, w.device, (fl.started - p.started) * 1e3, res.swapped,
                                                    res.wall_ms, (now - p.started) * 1e3,
                                                    dispatch_ms=(fl.sent - fl.started) * 1e3,
                                                    decide_ms=fl.decide_ms,
                                                    worker_ms=res.handled_ms, lane=res.lane, phases_ms=res.phases_ms,
                                                    to_worker_ms=(res.received_at - fl.piped_at) * 1e3,
                                                    from_worker_ms=(fl.read_at - res.answered_at) * 1e3,
                                                    expected_ms=fl.dispatch.expected_ms, answer_ms=answer_ms,
                                                    budget_ms=(p.request.deadline - p.started) * 1e3,
                                                    copy_ms=fl.dispatch.copy_ms))
                elif p.sink is not None:
                    p.sink.discard()
            # The answers go out first: their tasks run before this (queued after them), the next decision after.
            asyncio.get_running_loop().call_soon(self._account, w, fl, res, now)
        else:
            err = error or reply_error(reply)
            for p in fl.pending:
                self._fail(p, err)
        self.refresh_residency()
        if not self._key_users[fl.key]:
            del self._key_users[fl.key]
            self._on_released(fl.key)
        self.pump()
        if self._wanted:
            self._retry_prefetches()
        self._keep_hot()
        if queue and queue[0].deferred is not None:
            queue[0].deferred()

    def _account(self, w: wk.WorkerHandle, fl: _InFlight, res: RunResult, now: float) -> None:
        """A finished run's metrics, and what the scheduler learns from it."""
        fn_name = fl.dispatch.function
        for p in fl.pending:
            if now > p.due:
                self.metrics.count_slo_miss(fn_name)
            self.metrics.observe_node_request(fn_name, now - p.started)
        d = fl.dispatch
        self.runs.add(RunRecord(fl.begun, now, w.device, res.lane if fl.batch else d.lane, fn_name,
                                "run" if fl.batch else "piece" if d.piece_bytes else "prefetch", len(fl.pending),
                                d.source, res.swapped, res.bytes_copied, res.wall_ms, d.expected_ms))
        if fl.batch:  # a run, not a copy with no run (a prefetch or a piece of a swap)
            self.metrics.observe_compute(w.device, res.wall_ms / 1e3)
            if res.swapped:
                self.metrics.observe_swap(w.device, res.wall_ms / 1e3, res.bytes_copied)
                if res.lane:
                    self.metrics.count_side_fetch(w.device)
        else:
            self.metrics.count_swap_bytes(w.device, res.bytes_copied)
        if res.evicted:
            self.metrics.count_eviction(w.device, res.evicted)
        if res.from_peer:
            self.metrics.count_peer_copy(w.device)
        if res.placed_ahead:
            self.metrics.count_placed_ahead(w.device)
        if res.remaps:
            self.metrics.count_remaps(w.device, res.remaps, res.remap_unmaps)
        # A run from a lender copies, then runs (as a side lane's fetch); one that copied from host instead
        # (the lender no longer held the model whole) is not what its dispatch expected.
        from_host = fl.dispatch.source == "peer" and not res.from_peer
        self.scheduler.observe_completion(self.state, fn_name, w.index, fl.batch, res.wall_ms, res.swapped,
                                          (now - fl.begun) * 1e3, now,
                                          copy_ms=None if from_host else fl.dispatch.copy_ms,
                                          fetched=bool(res.lane) or res.from_peer, beside=fl.dispatch.beside,
                                          ahead=res.placed_ahead)

    def _keep_hot(self) -> None:
        """Keep the event loop polling (not sleeping) while runs are in flight and the scheduler's ``spin_ms``
        after."""
        if not self.scheduler.spin_ms:
            return
        self._hot_until = time.perf_counter() + self.scheduler.spin_ms / 1e3
        if not self._spinning:
            self._spinning = True
            self._spun_at = self.clock()
            self._cpu_at = (self._spun_at, time.thread_time())
            asyncio.get_running_loop().call_soon(self._spin)

    def keep_pause(self, ms: float, cpu_ms: float, generation: int) -> None:
        """A collection in this process held it ``ms`` (``cpu_ms`` of its CPU; ``heap.PauseLog.record``): kept as
        a stall."""
        now = self.clock()
        self.runs.add_stall(Stall(now - ms / 1e3, now, f"gc {generation}", cpu_ms))

    def _spin(self) -> None:
        # A ready callback makes the loop poll its sockets and pipes with a zero timeout instead of sleeping. From
        # one to the next is one turn of the loop: one that held it long is kept (``GET /api/v1/runs``).
        now = self.clock()
        if now - self._spun_at >= STALL_MS / 1e3:
            cpu = time.thread_time()
            self.runs.add_stall(Stall(self._spun_at, now, "loop", (cpu - self._cpu_at[1]) * 1e3))
            self._cpu_at = (now, cpu)
        elif now - self._cpu_at[0] >= CPU_SAMPLE_MS / 1e3:
            self._cpu_at = (now, time.thread_time())
        self._spun_at = now
        if self.live and self.scheduler.spin_ms and (any(self._inflight.values())
                                                     or time.perf_counter() < self._hot_until):
            asyncio.get_running_loop().call_soon(self._spin)
        else:
            self._spinning = False

    def refresh_residency(self, everything: bool = False) -> None:
        """Bring what workers reported into the scheduler's view: the models whose share changed since last
        time, or (``everything``: the entities' keys changed, a deploy or a delete) the whole of it."""
        by_key = self._entities
        if everything:
            self.state.forget_values()
            for sent in self._sent_values.values():  # the workers hold them by model key: send them anew
                sent.clear()
        for w, dev in zip(self._workers, self.state.devices):
            r = w.residency
            dev.used_bytes = r.used_bytes
            if everything:
                dev.resident = {by_key[k] for k, frac in r.present.items() if frac >= 1.0 and k in by_key}
                dev.partial = {by_key[k]: frac for k, frac in r.present.items() if frac < 1.0 and k in by_key}
            else:
                for k in r.changed:
                    if (entity := by_key.get(k)) is None:
                        continue
                    self.state.touch(entity)  # its value here, and on the others (a peer holds it, or not)
                    frac = r.present.get(k)
                    if frac is not None and frac >= 1.0:
                        dev.resident.add(entity)
                        dev.partial.pop(entity, None)
                    elif frac is not None:
                        dev.partial[entity] = frac
                        dev.resident.discard(entity)
                    else:
                        dev.resident.discard(entity)
                        dev.partial.pop(entity, None)
            r.changed.clear()
        # Pool, host-store and queue gauges are set from status() when /metrics is scraped.

    def _arm_timer(self, now: float) -> None:
        """Wake up when the earliest queued request would expire, so hopeless work is refused promptly, or
        when the scheduler says a decision may change (:meth:`Scheduler.wake_at`), whichever comes first."""
        deadlines = [self.state.queues[n].requests[0].deadline for n in self.state.nonempty()]
        if not deadlines:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        wake = self.scheduler.wake_at(self.state, now)
        at = min(deadlines) if wake is None else min(min(deadlines), wake)
        if self._timer is not None and self._timer_at == at:
            return  # already set for that deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.001, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None  # spent: the pump below arms a new one if anything is still queued
        self.pump()

    def fail_queued(self, name: str, error: SwapserveError) -> None:
        """Fail every queued request of ``name`` with ``error``."""
        q = self.state.queues.get(name)
        if q is None:
            return
        for r in list(q.requests):
            p = self._pending.pop(r.id, None)
            if p is not None:
                self._fail(p, error)
        q.requests.clear()

    @staticmethod
    def _fail(p: _Pending, error: BaseException) -> None:
        if not p.future.done():
            p.future.set_exception(error)


def _ignore(outcome: Any) -> None:
    """The reply to a command whose outcome changes nothing here (an unlend)."""


def reply_error(reply: Any) -> SwapserveError:
    if reply is None:
        return BackendError("no reply from the worker")
    err = SwapserveError(reply.error)
    err.http_status = reply.http_status
    return err
