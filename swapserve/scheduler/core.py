"""The scheduler's decision core: pure and synchronous, with the clock passed in.

The controller's async loop calls :meth:`Scheduler.admit` for each arrival, :meth:`Scheduler.decide`
whenever something changed (an arrival, a completion, a timer), applies the decision (or lets
:meth:`Scheduler.apply` do it) and reports completions through :meth:`Scheduler.observe_completion`.
The unit tests drive the same calls with a fake clock. Nothing here reads a clock,
draws a random number or does I/O; every tie is broken by a fixed rule (stated where it happens), so the
same state and time always give the same decision.

Policy ``swapserve`` (see :mod:`swapserve.scheduler.estimate` for the cost model):

* Admission refuses at once what the bounded queues cannot hold (429 function queue full, 503 node full)
  and, for ``late_policy: refuse``, what even the best plan cannot finish by its deadline (503 with an
  honest Retry-After), rather than letting it delay the requests that can still make theirs.
* Decisions bind work to idle devices only (late binding): functions in order of their head request's
  deadline (EDF), each a batch of its queue in deadline order up to ``max_batch`` items, on the device with
  the earliest expected finish (resident ≻ peer copy ≻ host copy on the least contended link) — including
  waiting for a busy device that holds the model when that finishes earlier than a swap now. Between devices
  that would finish alike (idle, the model on neither), a swap goes to the one that gives up least for it:
  free room, else the lowest eviction value (below) — not always to the first device. A function
  already running gets a second copy on another device only when its queue holds more than one batch
  (hot functions spread; one batch's worth waits for, or runs where, the model already is).
* Swaps in pieces: a first-lane swap whose copy is long (over two ``swap_piece_ms``) and whose deadline has
  room is dispatched as a piece (part of its missing bytes, no run; its requests stay queued); the next
  decision, after the piece, serves whatever is due first, then the next piece or the run with what is left.
  While its lane is busy (a piece of it, or other work) the swap waits, and holds the lane's next turn against
  what is due after it (:meth:`Scheduler._hold_first_lane`), from the decision that sends a piece on.
* Side lanes: a device with side lanes (``DeviceState.side``; ``serve --lanes K`` gives K - 1) runs a model
  that is wholly there in one of them, beside whatever its other lanes do (a swap of another model, say),
  when that finishes first; the first lane is the only one that swaps pipelined. Of a device's side lanes the
  one that frees first is evaluated (they are alike), and a busy one counts from when it frees (a resident
  model's request may wait a moment for it rather than queue behind a swap in the first lane). A run is
  slowed by the runs beside it (``LinkProfile.exec_slowdown_beside``: probed at start, then learned from the
  runs, :meth:`Scheduler.observe_completion`). Admission and
  triage count side lanes the same way. ``side_lanes`` (a running node's setting) limits how many of each
  device's side lanes new runs take (None: all).
* Side fetches (``side_fetch``, with a measured ``LinkProfile.fetch_GBps``): a side lane may also bring a
  model in itself — its missing bytes by kernel, then the run — when that finishes first, typically a
  small model's request arriving during a large model's swap, which would otherwise wait for all of it
  (most functions missing at N=400 on the H200 did, 4–8 ms behind the swap ahead). Only short copies
  (:data:`FETCH_MAX_MS`: a fetch holds up the first lane's copies while it lasts), and not for a model that
  is on its way or running anywhere (its bytes are coming, or another copy is not worth it).
* Queue-ahead (``queue_ahead``): a busy first lane takes one more run behind the one in progress when that is
  where the batch finishes first, and the worker starts it the moment the run ends (never a piece of a swap:
  pieces exist to leave room for what arrives meanwhile). Otherwise every swap that waits
  for the first lane also waits for the run's reply to reach the controller, the next decision and its
  message to reach the worker (1.5–3 ms per swap in the H200 traces, with the GPU's copy engine idle).
  ``queue_ahead_within_ms`` (a running node's setting; None, the default: no limit) sends one only when the
  run ahead is expected to end within that many ms: a run queued in a worker's lane can no longer go
  elsewhere, nor yield to a request with an earlier deadline that arrives meanwhile, and on one H200 at N=400
  such a wait was the largest part of 11–26 of 39–87 missing functions' worst requests (2026-11-28, seventh
  session). The controller decides again when a busy first lane comes within that of its end
  (:meth:`Scheduler.wake_at`).
* Eviction values rank by expected reuse (see :meth:`Scheduler.values`); with ``slo_values`` (a running node's
  setting, off by default) a swap's cost counts as a share of the function's SLO, not in ms.

Cold-start grace: a request is refused (or dropped) for lateness caused by *waiting*, not for the time its
model needs to come in when it is on no GPU at all. Otherwise a function whose SLO is shorter than its own
cold start would be refused forever, its model never loaded, and never warm.
"""

from __future__ import annotations

import heapq
import math
from bisect import insort_right
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from swapserve.scheduler.estimate import SOURCE_RANK, Estimate, View, rate_since, update_rate
from swapserve.scheduler.types import (
    Decision, DeviceState, Dispatch, FunctionQueue, ModelProfile, NodeState, Policy, Queued, Reject, Request, SideLane,
)

EXEC_WEIGHT = 0.2
"""Weight of a new observation in the exponentially weighted profile (about the last 5 runs count)."""
BESIDE_WEIGHT = 0.05
"""Weight of a run's observed slowdown beside others in the node's figure (about the last 20 such runs of any
function count)."""
OUTLIER_FACTOR = 4.0
"""A single observation moves a profile at most by this factor (a GC pause or preemption is not a new
normal); a real change still gets there in a few runs."""
RECENCY_FLOOR_S = 1.0
"""Added to a model's age in the recency term so that a model used this instant is worth a finite rate."""
NOFIT_RETRY_S = 60.0
"""Retry-After for a model larger than every device's pool (retrying will not help until one is added)."""
VALUE_REUSE_S = 0.25
"""How long a device's eviction values are reused, computed again only for the functions touched meanwhile
(:meth:`NodeState.touch`: a use, an arrival, a change of residency, a new profile): what moves the others is
the decay of their rate estimates (half-life 60 s) and of their recency (seconds), too slow to reorder models
within this. Checking each model's inputs instead (the eighth session's memo) cost ~0.8 µs a model on the CI
box — 0.12 ms of a swap decision on one device holding 144 models, most of the decision — where reusing the
values whole costs a dict copy."""
VALUE_SLICE = 64
"""Models of a device valued per call of :meth:`Scheduler.refresh_values` (~0.1 ms on the CI box): the
controller's loop does other work between the slices of a round."""

SWAP_PIECE_MS = 3.0
"""Default length of a swap's pieces. A swap whose copy would hold the first lane longer than two pieces
comes in pieces while its deadline has room: the first lane is the only one that swaps, so a request
arriving during a 15 ms copy of a big model waited for all of it (on the H200 at N=400, 56 of 71 refusals
came during a swap of BERT-large or GPT-2 medium); between pieces, EDF serves what is due first."""
FETCH_MAX_MS = 3.0
"""The longest copy a side lane's fetch may make (at ``LinkProfile.fetch_GBps``). A fetch's reads take the
host link from the first lane's copies for as long as they last (a 100 MiB fetch beside a 640 MiB swap on the
H200: the fetch 2.7 ms, the swap 2 ms longer): short ones are worth it, as a swap's pieces are; with no bound,
fetches of GPT-2 and BERT-large (15 ms each) made the first lane's swaps miss (attainment 0.64 against 0.78
without fetches, one H200, N=400)."""
COPY_OVERHEAD_WEIGHT = 0.05
"""Weight of one copy-only dispatch's overhead in the node's figure (``LinkProfile.copy_overhead_ms``: about the
last 20 pieces or prefetches of any function count)."""


def _clamped(sample: float, around: float) -> float:
    """``sample`` held to within :data:`OUTLIER_FACTOR` of ``around`` (a positive figure)."""
    return min(max(sample, around / OUTLIER_FACTOR), around * OUTLIER_FACTOR)


def _toward(old: float, sample: float, weight: float) -> float:
    """A learned figure ``old`` moved ``weight`` of the way toward one observation, clamped first
    (:func:`_clamped`): one outlier is not a new normal."""
    return old + weight * (_clamped(sample, old) - old)


def _retry_s(seconds: float) -> float:
    """Retry-After in whole seconds (HTTP sends integers), never less than 1."""
    return float(max(1, math.ceil(seconds))) if math.isfinite(seconds) else NOFIT_RETRY_S


def _penalty_ms(prof: ModelProfile, bytes_per_ms: float, slowdown: float, frac: float) -> float:
    """Extra ms of a batch-1 run if ``frac`` of the model's bytes were evicted, copying them back at
    ``bytes_per_ms`` (from host, or from a peer that holds it where that is faster): a swapped run is the
    slower of copy and (slowed) compute plus the fixed overhead, so a model that computes longer than it
    copies costs little to drop."""
    exec_ms = prof.exec_at(1)
    slowed = exec_ms * slowdown
    whole, left = prof.nbytes, prof.nbytes * (1.0 - frac)  # a run's missing bytes now, and with frac evicted
    before = max(whole / bytes_per_ms, slowed) + prof.swap_overhead_ms if whole > 0 else exec_ms
    after = max(left / bytes_per_ms, slowed) + prof.swap_overhead_ms if left > 0 else exec_ms
    return max(before - after, 1e-6)  # keep the reuse order among models that are free to reload


def _held(dev: DeviceState) -> set[str]:
    """The functions whose bytes are on ``dev``, whole or in part, or on their way in its lanes (what has an
    eviction value there)."""
    return set(dev.resident) | set(dev.partial) | set(dev.first_lane) | set(dev.side_running)


def _batch(requests: list[Request], max_batch: int) -> tuple[list[Request], int, list[Request]]:
    """The head requests (deadline order) whose items fit ``max_batch``, their items, and the rest; stops at the
    first that does not fit rather than skipping it, so no request overtakes an earlier deadline. The head is
    always taken."""
    total = 0
    for i, r in enumerate(requests):
        if i > 0 and total + r.items > max_batch:
            return requests[:i], total, requests[i:]
        total += r.items
    return requests, total, []


class Scheduler:
    """Decisions for one node. Holds only its policy and constants; all state lives in ``NodeState``."""

    def __init__(self, policy: Policy = "swapserve", rate_halflife_s: float = 60.0,
                 swap_piece_ms: float = SWAP_PIECE_MS, queue_ahead: bool = False, side_fetch: bool = False,
                 queue_ahead_within_ms: float | None = None, peer_copies: bool = False,
                 side_lanes: int | None = None, place_ahead: bool = False, gateway_margin: bool = False,
                 spin_ms: float = 0.0, slo_values: bool = False):
        """``swap_piece_ms``: the length of a swap's pieces (0: swaps in one go). ``queue_ahead``: under
        ``swapserve``, a device's first lane may take one more dispatch behind the one it runs
        (``queue_ahead_within_ms``: only when that is expected to end within so many ms; None: whenever).
        ``side_fetch``: under ``swapserve``, a side lane may bring a small model in itself (:meth:`may_fetch`).
        ``peer_copies``: under ``swapserve``, a model may be copied from another device that holds it, where the
        node measured ``LinkProfile.d2d_GBps`` (faster than from host: NVLink). ``side_lanes``: how many of each
        device's side lanes new runs may take (None: every one the device has). ``place_ahead``: under
        ``swapserve``, the run right behind the one a first lane has launched has its pages placed and its
        copies started meanwhile (the workers do it; the scheduler only carries the setting). ``gateway_margin``:
        under ``swapserve``, a request's deadline is its SLO less the gateway's time outside the node's plan (its
        decoding, and its answer's encoding and writing as the gateway learned them for the function: the
        controller applies it; the scheduler only carries the setting). ``spin_ms``: the controller's event loop
        polls rather than sleeps while runs are in flight and this long after each arrival and each run's end,
        and each worker this long after each answer (``Run.spin_s``), under any policy (0: they sleep; the
        dispatcher applies it; the scheduler only carries the setting). ``slo_values``: under ``swapserve``, the
        eviction values weigh what losing a model's bytes costs its next request as a share of its function's SLO
        (:meth:`values`), so that of two models a swap slows alike, the one with the tighter SLO stays."""
        if policy not in ("swapserve", "fifo_lru", "dedicated"):
            raise ValueError(f"unknown policy {policy!r} (swapserve, fifo_lru or dedicated)")
        if not rate_halflife_s > 0:
            raise ValueError("rate_halflife_s must be positive")
        if not swap_piece_ms >= 0:
            raise ValueError("swap_piece_ms must be 0 (off) or positive")
        if queue_ahead_within_ms is not None and not queue_ahead_within_ms >= 0:
            raise ValueError("queue_ahead_within_ms must be None (no limit) or ≥ 0")
        if side_lanes is not None and not side_lanes >= 0:
            raise ValueError("side_lanes must be None (all) or ≥ 0")
        if not 0 <= spin_ms <= 1000:
            raise ValueError("spin_ms must be in [0, 1000]")
        self.policy: Policy = policy
        self.rate_halflife_s = rate_halflife_s
        self.swap_piece_ms = swap_piece_ms
        self.queue_ahead = queue_ahead and policy == "swapserve"
        self.side_fetch = side_fetch and policy == "swapserve"
        self.queue_ahead_within_ms = queue_ahead_within_ms
        self.peer_copies = peer_copies and policy == "swapserve"
        self.side_lanes = side_lanes
        self.place_ahead = place_ahead and policy == "swapserve"
        self.gateway_margin = gateway_margin and policy == "swapserve"
        self.spin_ms = float(spin_ms)
        self.slo_values = slo_values and policy == "swapserve"

    # --- admission ---------------------------------------------------------------------------------

    def admit(self, state: NodeState, request: Request, now: float) -> Reject | None:
        """Accept ``request`` into its function's queue (inserted in deadline order, after equal deadlines,
        and counted in the function's arrival rate) or refuse it; a refusal leaves ``state`` unchanged.

        Refusals: 429 when the function's queue is full; 503 when the node's is; 503 when the model fits
        no device; under ``swapserve`` with ``late_policy: refuse``, 503 when the best plan cannot finish
        it by its deadline (plus cold-start grace). Retry-After is when it could be served: for lateness
        L (planned finish minus deadline), the same request sent L later meets its own deadline if the work
        now ahead of it is what delays it. Raises KeyError for a function without a queue.
        """
        fq = state.queues.get(request.function)
        if fq is None:
            raise KeyError(f"no queue for function {request.function!r}")
        prof = self._profile(state, request.function)
        if len(fq.requests) >= fq.max_queue:
            return Reject(request.id, 429, _retry_s(self._drain_s(state, now)),
                          f"function {request.function!r} has {len(fq.requests)} queued requests (max_queue)")
        queued = state.queued
        if queued >= state.max_queued:
            return Reject(request.id, 503, _retry_s(self._drain_s(state, now)),
                          f"node has {queued} queued requests (max_queued)")
        if self.policy == "dedicated" and request.function not in state.dedicated:
            return Reject(request.id, 503, NOFIT_RETRY_S,
                          f"function {request.function!r} has no dedicated device (the pools are full)")
        if not any(prof.nbytes <= d.pool_bytes for d in state.devices):
            return Reject(request.id, 503, NOFIT_RETRY_S,
                          f"model of {request.function!r} ({prof.nbytes} bytes) fits no device's pool")
        if self.policy == "swapserve" and fq.late_policy == "refuse":
            finish, grace_s = self._planned_finish(state, request, now)
            late = finish - (request.deadline + grace_s)
            if late > 0:
                return Reject(request.id, 503, _retry_s(late),
                              f"cannot meet the deadline: expected {1000 * (finish - request.deadline):.1f} ms late")
        fq.rate = update_rate(fq.rate, fq.last_arrival, now, self.rate_halflife_s)
        fq.last_arrival = now
        state.touch(request.function)
        insort_right(fq.requests, request, key=lambda r: r.deadline)
        state.mark_waiting(request.function)
        return None

    def _planned_finish(self, state: NodeState, request: Request, now: float) -> tuple[float, float]:
        """When ``request`` would finish, and the cold-start grace it needs (s), by a list-scheduling simulation of
        everything queued with a deadline no later than its own: batches of each function (deadline order,
        up to max_batch items) taken in EDF order, each on the device where it finishes first, from when
        each device becomes free, what it holds and what the batch must copy. Queued requests of refusing
        functions whose deadline has passed are left out (they are about to be dropped).

        Two shortcuts keep admission cheap when queues are long. Accept without simulating when the bound
        ``mean device free time + Σ worst-case service ahead / n + own worst case`` (Graham's list
        scheduling argument: every planned batch raises the devices' summed free time by its service, and
        the request's batch finishes no later than on the least loaded device) already meets the deadline.
        Stop simulating once no device frees before the deadline (it is late whatever follows) and
        extrapolate the finish, for Retry-After, from the best-case work still ahead spread over the devices.
        The grace is left at 0 where the bound already meets the deadline (no grace, never negative, changes that).
        """
        view = self._view(state, now)
        prof_own = self._profile(state, request.function)
        batches = self._batches_ahead(state, request, now)
        worst: dict[tuple[str, int], float] = {}  # memo: queues hold many batches of few shapes
        best: dict[tuple[str, int], float] = {}
        for _, name, _, items, _ in batches:
            if (name, items) not in worst:
                prof = self._profile(state, name)
                worst[name, items] = view.worst_case_ms(prof, items)
                best[name, items] = prof.exec_at(items)
        bound = None
        if all(view.fits(prof_own, d) for d in range(view.n)):
            ahead_ms = sum(worst[b[1], b[3]] for b in batches if not b[4])
            own_ms = next(worst[b[1], b[3]] for b in batches if b[4])
            bound = (sum(view.free_at) + ahead_ms / 1000.0) / view.n + own_ms / 1000.0
            if bound <= request.deadline:
                return bound, 0.0
        grace_s = self._grace_s(view, request.function, prof_own, request.items)
        limit = request.deadline + grace_s
        if bound is not None and bound <= limit:
            return bound, grace_s
        for i, (_, name, _, items, mine) in enumerate(batches):
            prof = self._profile(state, name)
            if view.earliest_free() > limit:
                rest_ms = sum(best[b[1], b[3]] for b in batches[i:])
                mean = sum(view.free_at) / view.n
                return max(min(view.free_at) + prof_own.exec_at(request.items) / 1000.0,
                           mean + rest_ms / 1000.0 / view.n), grace_s
            ests = [e for d in view.candidates(name, prof) if (e := view.estimate(name, prof, items, d, view.free_at[d]))]
            ests += view.side_estimates(name, prof, items, now, self.may_fetch(state, name))
            if not ests:
                if mine:
                    return math.inf, grace_s
                continue
            pick = min(ests, key=lambda e: e.key(True))
            if mine:
                return pick.finish, grace_s
            view.commit(pick, name)
            view.prune()
        raise AssertionError("unreachable: the request's own batch is always planned")

    def _batches_ahead(self, state: NodeState, request: Request,
                       now: float) -> list[tuple[float, str, int, int, bool]]:
        """(head deadline, function, seq, items, is the request's own) of every batch due no later than
        ``request``, the request's own batch last of its function, in EDF order (ties: function, seq)."""
        batches: list[tuple[float, str, int, int, bool]] = []
        # Only non-empty queues (and the request's own): hundreds of idle functions cost nothing here. In any
        # order: the batches are sorted below.
        for name in {*state.nonempty(), request.function}:
            fq = state.queues[name]
            ahead = [r for r in fq.requests if r.deadline <= request.deadline
                     and not (fq.late_policy == "refuse" and r.deadline < now)]
            if name == request.function:
                ahead.append(request)
            seq = 0
            while ahead:
                batch, items, ahead = _batch(ahead, fq.max_batch)
                mine = name == request.function and not ahead
                batches.append((batch[0].deadline, name, seq, items, mine))
                seq += 1
        batches.sort()  # by (deadline, function, seq): no two batches share the last two
        return batches

    # --- decisions ---------------------------------------------------------------------------------

    def decide(self, state: NodeState, now: float) -> Decision:
        """What to start now on idle devices, and which queued requests to drop. Does not modify ``state``:
        the controller removes dispatched and rejected requests from the queues and marks devices busy
        (:meth:`apply` does exactly that)."""
        if self.policy == "fifo_lru":
            return self._decide_fifo(state, now)
        if self.policy == "dedicated":
            return self._decide_dedicated(state, now)
        view = self._view(state, now)
        rejects: list[Reject] = []
        pending: dict[str, list[Request]] = {}
        for name in state.nonempty():
            fq = state.queues[name]
            if fq.requests:
                keep, dropped = self._triage(view, fq, self._profile(state, name), now, self.may_fetch(state, name))
                rejects += dropped
                if keep:
                    pending[name] = keep
        queued_items = {name: sum(r.items for r in reqs) for name, reqs in pending.items()}
        # In one pass over the devices: the functions running (or queued) in a lane of one in service; the
        # idle devices; the first lanes that would take one more dispatch behind the one they run. Then the side
        # lanes free now, as (device, lane).
        active: set[str] = set()
        free: set[int] = set()
        ahead: set[int] = set()
        side: set[tuple[int, int]] = set()
        pieces: dict[str, int] = {}  # function -> the device whose first lane copies a piece of its swap
        for d in state.devices:
            if not d.out:
                active.update(d.first_lane)
                active.update(d.side_running)
                if d.piece and d.running is not None:
                    pieces[d.running] = d.index
            if d.idle:
                free.add(d.index)
            elif self.queue_ahead and not d.out and d.queued is None:
                ahead.add(d.index)
        side.update((d, ln) for d in range(view.n) for ln in range(1, view.side_lanes[d] + 1)
                    if view.side_idle_now(d, ln))
        values: dict[int, dict[str, float]] = {}
        dispatches: list[Dispatch] = []
        # EDF over functions; the name breaks deadline ties.
        heap = [(reqs[0].deadline, name) for name, reqs in pending.items()]
        heapq.heapify(heap)
        while heap and (free or side or ahead):
            _, name = heapq.heappop(heap)
            fq, prof = state.queues[name], self._profile(state, name)
            # A function already running somewhere spreads to another copy only when its queue is more
            # than one batch (hot); otherwise it may use only devices that already hold its model.
            no_new_copy = name in active and queued_items[name] <= fq.max_batch
            batch, items, rest = _batch(pending[name], fq.max_batch)
            if (d_piece := pieces.get(name)) is not None:  # its swap goes on there once the piece has landed
                self._hold_first_lane(view, ahead, name, prof, items, d_piece)
                continue
            cands: list[tuple[tuple[float, int, int, int, int], int, int]] = []
            ests = {}
            fetch = self.may_fetch(state, name) and name not in active
            for d in range(view.n):
                # A busy side lane counts too, from when it frees: waiting for it may beat the first lane.
                if (se := view.side_estimate(name, prof, items, d, now, fetch)) is not None:
                    ests[d, se.lane] = se
                    cands.append((se.key(self._side_now(state, side, se, name)), d, se.lane))
                if d in free and not (no_new_copy and not view.holds(name, d, now)):
                    e = view.estimate(name, prof, items, d, now)
                elif (d in ahead and self._ahead_now(view, d)
                      and not (no_new_copy and not view.holds(name, d, view.free_at[d]))):
                    # Behind the run there: it starts when that ends, wherever its bytes come from.
                    e = view.estimate(name, prof, items, d, view.free_at[d])
                elif view.holds(name, d, view.free_at[d]):
                    # Affinity: waiting for a busy device only pays where the model already is (or is
                    # arriving); a copy is about as dear later as now, and the device may be claimed.
                    e = view.estimate(name, prof, items, d, view.free_at[d])
                else:
                    continue
                if e is not None:
                    ests[d, 0] = e
                    cands.append((e.key(self._first_now(view, free, ahead, d)), d, 0))
            if not cands:
                continue
            best = ests[self._tie_break(state, view, name, prof, cands, values, now)]
            if not (self._side_now(state, side, best, name) if best.lane else
                    self._first_now(view, free, ahead, best.device)):
                continue  # it finishes sooner in a lane that frees (or has its model) soon: leave it queued
            piece = 0 if best.lane else self._piece_bytes(view, prof, best, batch[0].deadline, name)
            if piece and best.device not in free:
                self._hold_first_lane(view, ahead, name, prof, items, best.device)  # pieces are never queued ahead
                continue
            # Eviction values matter only to a dispatch that brings bytes in (O(models on the device) to compute).
            if best.source != "resident" and best.device not in values:
                values[best.device] = self.values(state, best.device, now)
            evict = values[best.device] if best.source != "resident" else {}
            if piece:
                piece_ms = min(self.swap_piece_ms, best.copy_ms)
                lane_ms = piece_ms + view.link.copy_overhead_ms
                dispatches.append(Dispatch(best.device, name, (), best.source, lane_ms, copy_ms=piece_ms,
                                           values=evict, piece_bytes=piece))
                free.discard(best.device)
                view.commit(Estimate(best.device, best.source, None, best.start, piece_ms, lane_ms), name,
                            whole=False)
                # Its requests stay queued: the decision after the piece places them (or another piece). Its swap
                # goes on there then, and holds the lane's next turn as in the decisions while the piece runs:
                # nothing placed after it in this pass (due later) queues behind the piece.
                self._hold_first_lane(view, ahead, name, prof, items, best.device)
                continue
            dispatches.append(Dispatch(best.device, name, tuple(r.id for r in batch), best.source, best.total_ms,
                                       peer=best.peer, copy_ms=best.copy_ms, values=evict, lane=best.lane,
                                       beside=best.beside))
            if best.lane:
                side.discard((best.device, best.lane))
            else:
                self._take_first_lane(best.device, free, ahead)
            view.commit(best, name)
            active.add(name)
            pending[name] = rest
            if rest:
                heapq.heappush(heap, (rest[0].deadline, name))
        return Decision(tuple(dispatches), tuple(rejects))

    def settings(self) -> dict[str, Any]:
        """The settings a running node may change (:meth:`configure`), and the ones fixed at its start."""
        return {"policy": self.policy, "queue_ahead": self.queue_ahead, "side_fetch": self.side_fetch,
                "swap_piece_ms": self.swap_piece_ms, "queue_ahead_within_ms": self.queue_ahead_within_ms,
                "peer_copies": self.peer_copies, "side_lanes": self.side_lanes, "place_ahead": self.place_ahead,
                "gateway_margin": self.gateway_margin, "spin_ms": self.spin_ms, "slo_values": self.slo_values}

    def configure(self, state: NodeState, changes: dict[str, Any]) -> dict[str, Any]:
        """Change ``side_fetch`` (bool), ``swap_piece_ms`` (≥ 0), ``queue_ahead_within_ms`` (≥ 0, or None: no
        limit), ``peer_copies`` (bool), ``side_lanes`` (0 up to the devices' side lanes, or None: all),
        ``place_ahead``, ``gateway_margin`` and ``slo_values`` (bools), ``spin_ms`` (≥ 0) on a running node — so
        that a benchmark can compare them on one node, and an operator tune a live one — all or nothing, checked
        first. Returns :meth:`settings`. Raises ValueError naming what is wrong."""
        problems = []
        for key, value in changes.items():
            if key == "side_fetch":
                problems += self._switch_problems(key, value, "side fetches", state.link.fetch_GBps is not None,
                                                  "need a second lane per device (serve --lanes 2)")
            elif key == "peer_copies":
                problems += self._switch_problems(key, value, "peer copies", state.link.d2d_GBps is not None,
                                                  "need two or more devices that can map each other's pages "
                                                  "(none measured at start)")
            elif key == "swap_piece_ms":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
                    problems.append(f"swap_piece_ms must be a number of ms in [0, 1000], not {value!r}")
            elif key == "spin_ms":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
                    problems.append(f"spin_ms must be a number of ms in [0, 1000], not {value!r}")
            elif key == "queue_ahead_within_ms":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 <= value <= 1000):
                    problems.append(f"queue_ahead_within_ms must be null (no limit) or a number of ms in [0, 1000], "
                                    f"not {value!r}")
            elif key == "place_ahead":
                problems += self._switch_problems(key, value, "pages placed ahead", True, "")
            elif key == "gateway_margin":
                problems += self._switch_problems(key, value, "gateway margins", True, "")
            elif key == "slo_values":
                problems += self._switch_problems(key, value, "eviction values in shares of SLOs", True, "")
            elif key == "side_lanes":
                most = max((len(d.side) for d in state.devices), default=0)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or not 0 <= value <= most):
                    problems.append(f"side_lanes must be null (all) or a whole number in [0, {most}] (the "
                                    f"devices' side lanes: serve --lanes {most + 1}), not {value!r}")
            elif key in ("policy", "queue_ahead"):
                problems.append(f"{key} is fixed when the node starts (swapserve serve)")
            else:
                problems.append(f"unknown setting {key!r}: a running node changes side_fetch, swap_piece_ms, "
                                "queue_ahead_within_ms, peer_copies, side_lanes, place_ahead, gateway_margin, "
                                "spin_ms and slo_values")
        if problems:
            raise ValueError("; ".join(problems))
        if "side_fetch" in changes:
            self.side_fetch = changes["side_fetch"]
        if "swap_piece_ms" in changes:
            self.swap_piece_ms = float(changes["swap_piece_ms"])
        if "queue_ahead_within_ms" in changes:
            within = changes["queue_ahead_within_ms"]
            self.queue_ahead_within_ms = None if within is None else float(within)
        if "peer_copies" in changes:
            self.peer_copies = changes["peer_copies"]
        if "side_lanes" in changes:
            self.side_lanes = changes["side_lanes"]
        if "place_ahead" in changes:
            self.place_ahead = changes["place_ahead"]
        if "gateway_margin" in changes:
            self.gateway_margin = changes["gateway_margin"]
        if "spin_ms" in changes:
            self.spin_ms = float(changes["spin_ms"])
        if "slo_values" in changes:
            self.slo_values = changes["slo_values"]
        return self.settings()

    def _switch_problems(self, key: str, value: Any, what: str, possible: bool, needs: str) -> list[str]:
        """What is wrong with turning ``key`` (a feature of the swapserve policy, ``what``) to ``value``: not a
        bool, the wrong policy, or (``possible`` false) the node lacks what it ``needs``."""
        if not isinstance(value, bool):
            return [f"{key} must be true or false, not {value!r}"]
        if value and self.policy != "swapserve":
            return [f"{what} exist only under the swapserve policy (this node: {self.policy})"]
        if value and not possible:
            return [f"{what} {needs}"]
        return []

    @property
    def value_basis(self) -> tuple[bool, bool]:
        """The settings the eviction values depend on (``peer_copies``, ``slo_values``): a device's values
        computed under others are computed anew, whole (:meth:`values`, :meth:`refresh_values`)."""
        return self.peer_copies, self.slo_values

    def may_fetch(self, state: NodeState, function: str) -> bool:
        """Whether a side lane may bring ``function``'s model in itself: side fetches on, their bandwidth
        measured, and the whole model copied within :data:`FETCH_MAX_MS`."""
        gbps = state.link.fetch_GBps
        return (self.side_fetch and gbps is not None
                and self._profile(state, function).nbytes <= FETCH_MAX_MS * gbps * 1e6)

    def _tie_break(self, state: NodeState, view: View, name: str, prof: ModelProfile,
                   cands: list[tuple[tuple[float, int, int, int, int], int, int]],
                   values: dict[int, dict[str, float]], now: float) -> tuple[int, int]:
        """The (device, lane) of the best candidate: the least :meth:`Estimate.key`; between devices whose
        estimates tie on all of it but the device — idle devices alike, the model on neither (the common case
        on a node of many functions) — the one whose pool gives up least for the model's missing bytes: nothing
        where they fit its free room, else its next victim's worth (the lowest of its eviction values,
        :meth:`values`); then the lowest index. The lowest index alone sent the first GPU of two 2.5–6 times the
        swaps of the second in every two-GPU replay (sessions 24 and 25): the models it swapped in then ran
        there too, and its queues and evictions grew while the second's pool kept models nobody called.
        ``values`` holds each device's eviction values for the decision (filled here as needed)."""
        top = min(cands)
        if top[0][2] == SOURCE_RANK["resident"]:
            return top[1:]
        tied = [c for c in cands if c[0][:4] == top[0][:4]]
        if len(tied) == 1:
            return top[1:]

        def given_up(c: tuple[tuple[float, int, int, int, int], int, int]) -> tuple[float, int, int]:
            device = state.devices[c[1]]
            if device.pool_bytes - device.used_bytes >= prof.nbytes * (1.0 - view.partial_fraction(name, c[1])):
                return 0.0, c[1], c[2]
            if c[1] not in values:
                values[c[1]] = self.values(state, c[1], now)
            return min(values[c[1]].values(), default=0.0), c[1], c[2]

        return min(tied, key=given_up)[1:]

    @staticmethod
    def _side_now(state: NodeState, side: set[tuple[int, int]], est: Estimate, function: str) -> bool:
        """Whether a side-lane estimate may be sent now: its lane is free, and a resident run's model is whole on
        the device as the worker last said. One on its way in another lane, even in a run past its expected end,
        is waited for: the worker would hand the run to the first lane, behind the swap it was to avoid."""
        return (est.device, est.lane) in side and (est.source != "resident"
                                                   or function in state.devices[est.device].resident)

    def _first_now(self, view: View, free: set[int], ahead: set[int], device: int) -> bool:
        """Whether a dispatch to ``device``'s first lane may be sent now: the lane is free, or it may take one
        behind its run now (:meth:`_ahead_now`)."""
        return device in free or (device in ahead and self._ahead_now(view, device))

    def _ahead_now(self, view: View, device: int) -> bool:
        """Whether a run may be queued behind ``device``'s first lane now: the run there is expected to end
        within ``queue_ahead_within_ms``."""
        within = self.queue_ahead_within_ms
        return within is None or view.free_at[device] - view.now <= within / 1000.0

    def wake_at(self, state: NodeState, now: float) -> float | None:
        """When a decision may change with no event before it (None: only events change it): a busy first lane
        coming within ``queue_ahead_within_ms`` of its end, while requests are queued and it has none behind."""
        within = self.queue_ahead_within_ms
        if within is None or not self.queue_ahead or not state.waiting:
            return None
        at = [d.busy_until - within / 1000.0 for d in state.devices
              if d.busy_until is not None and d.queued is None and d.busy_until - within / 1000.0 > now]
        return min(at, default=None)

    @staticmethod
    def _hold_first_lane(view: View, ahead: set[int], function: str, prof: ModelProfile, items: int,
                         device: int) -> None:
        """A swap that comes in pieces waits for ``device``'s first lane to free, and holds that lane's next turn:
        the decision plans the swap there from then, and what it places after it (due later: EDF) neither queues
        behind the run there nor plans to start before the swap. Otherwise a long swap due later took the turn,
        and the swap, its room between pieces spent, missed its deadline behind it (BERT-large bursts behind
        GPT-2 and VGG swaps on two H200s)."""
        ahead.discard(device)
        if (est := view.estimate(function, prof, items, device, view.free_at[device])) is not None:
            view.commit(est, function)

    def _take_first_lane(self, device: int, free: set[int], ahead: set[int]) -> None:
        """A dispatch went to ``device``'s first lane: an idle one may still take one behind it."""
        if device in free:
            free.discard(device)
            if self.queue_ahead:
                ahead.add(device)
        else:
            ahead.discard(device)

    def _piece_bytes(self, view: View, prof: ModelProfile, best: Estimate, deadline: float, function: str) -> int:
        """Bytes of the first piece to copy now instead of running ``best`` (a first-lane swap), or 0 to run
        it whole: when the copy is short (two pieces or less), or when the batch's deadline has no room
        for the pieces' cost plus two pieces of other work between them."""
        piece_ms = self.swap_piece_ms
        if not piece_ms or best.lane or best.source not in ("host", "partial") or best.copy_ms <= 2 * piece_ms:
            return 0
        extra = math.ceil(best.copy_ms / piece_ms) - 1
        if best.finish + (extra * view.link.copy_overhead_ms + 2 * piece_ms) / 1000.0 > deadline:
            return 0
        missing = prof.nbytes * (1.0 - view.partial_fraction(function, best.device))
        return max(1, int(missing * piece_ms / best.copy_ms))

    def prefetch(self, state: NodeState, function: str, now: float) -> Dispatch | None:
        """Where to copy ``function``'s model in ahead of its requests — a handler's sandbox is starting,
        say, and its model calls will follow — or None: not under ``swapserve``, when the model is already
        on (or arriving at) a device, when requests of it are queued (the next decision places them), or
        when no device that fits it has its first lane idle (a prefetch never waits, nor delays others).
        The dispatch has no requests; its expected time is the copy's and the node's overhead of a copy
        (``LinkProfile.copy_overhead_ms``). Apply it with :meth:`apply`."""
        if self.policy != "swapserve":
            return None
        prof = self._profile(state, function)
        fq = state.queues.get(function)
        if prof.nbytes <= 0 or (fq is not None and fq.requests):
            return None
        if any(function in d.resident or function in d.partial or function in d.first_lane
               for d in state.devices if not d.out):
            return None
        view = self._view(state, now)
        ests = [e for d in state.devices if d.idle and view.fits(prof, d.index)
                if (e := view.estimate(function, prof, 1, d.index, now, allow_peer=False)) is not None]
        if not ests:
            return None
        best = min(ests, key=lambda e: e.key(True))
        return Dispatch(best.device, function, (), best.source, best.copy_ms + state.link.copy_overhead_ms,
                        copy_ms=best.copy_ms, values=self.values(state, best.device, now))

    def _triage(self, view: View, fq: FunctionQueue, prof: ModelProfile, now: float,
                fetch: bool) -> tuple[list[Request], list[Reject]]:
        """Split a queue into requests still worth serving and those to drop: all of them if the model fits
        no device; under ``refuse``, those that would miss their deadline (plus cold-start grace) even if
        they were next on the device where they would finish first."""
        if not any(view.fits(prof, d) for d in range(view.n)):
            reason = (f"model of {fq.function!r} fits no device's pool" if any(view.serving) else
                      "no device is in service (its worker is starting again)")
            return [], [Reject(r.id, 503, NOFIT_RETRY_S, reason) for r in fq.requests]
        if fq.late_policy != "refuse":
            return list(fq.requests), []
        keep: list[Request] = []
        rejects: list[Reject] = []
        earliest: dict[int, float] = {}  # items → earliest finish (s)
        grace: dict[int, float] = {}  # items → cold-start grace (s), of the sizes that need it
        for r in fq.requests:
            if r.items not in earliest:
                ests = [e for d in range(view.n)
                        if (e := view.estimate(fq.function, prof, r.items, d, view.free_at[d]))]
                ests += view.side_estimates(fq.function, prof, r.items, now, fetch)
                earliest[r.items] = min(e.finish for e in ests)
            finish = earliest[r.items]
            # The grace is never negative: a request that finishes by its deadline is kept without it.
            if finish > r.deadline:
                if r.items not in grace:
                    grace[r.items] = self._grace_s(view, fq.function, prof, r.items)
                late = finish - (r.deadline + grace[r.items])
                if late > 0:
                    rejects.append(Reject(r.id, 503, _retry_s(late), "deadline can no longer be met: expected "
                                          f"{1000 * (finish - r.deadline):.1f} ms late"))
                    continue
            keep.append(r)
        return keep, rejects

    def _decide_fifo(self, state: NodeState, now: float) -> Decision:
        """The baseline: requests in arrival order across functions (ties: function name, then queue
        order), one per dispatch, each on the lowest-index idle device that can hold it, bytes from host
        unless resident; never dropped for lateness."""
        view = self._view(state, now)
        free = sorted(d.index for d in state.devices if d.idle)
        order = sorted(((r.arrival, name, i), r) for name in state.nonempty()
                       for i, r in enumerate(state.queues[name].requests))
        dispatches: list[Dispatch] = []
        rejects: list[Reject] = []
        for (_, name, _), r in order:
            prof = self._profile(state, name)
            if not any(view.fits(prof, d) for d in range(view.n)):
                rejects.append(Reject(r.id, 503, NOFIT_RETRY_S, f"model of {name!r} fits no device's pool"))
                continue
            if not free:
                continue
            d = next((d for d in free if view.fits(prof, d)), None)
            if d is None:
                continue  # only smaller devices are idle: it waits for a big one; later arrivals may go
            e = view.estimate(name, prof, r.items, d, now, allow_peer=False)
            assert e is not None
            dispatches.append(Dispatch(d, name, (r.id,), e.source, e.total_ms, copy_ms=e.copy_ms,
                                       values=self.values(state, d, now) if e.source != "resident" else {}))
            view.commit(e, name)
            free.remove(d)
        return Decision(tuple(dispatches), tuple(rejects))

    def _decide_dedicated(self, state: NodeState, now: float) -> Decision:
        """The dedicated baseline: each idle device serves the function pinned to it whose head request is
        due first, a batch of its queue up to max_batch; nothing moves between devices."""
        view = self._view(state, now)
        dispatches: list[Dispatch] = []
        for dev in state.devices:
            if not dev.idle:
                continue
            mine = [(state.queues[name].requests[0].deadline, name) for name in state.nonempty()
                    if state.dedicated.get(name) == dev.index]
            if not mine:
                continue
            _, name = min(mine)
            fq, prof = state.queues[name], self._profile(state, name)
            batch, items, _ = _batch(fq.requests, fq.max_batch)
            e = view.estimate(name, prof, items, dev.index, now, allow_peer=False)
            if e is None:
                continue
            dispatches.append(Dispatch(dev.index, name, tuple(r.id for r in batch), e.source, e.total_ms,
                                       copy_ms=e.copy_ms,
                                       values=self.values(state, dev.index, now) if e.source != "resident" else {}))
            view.commit(e, name)
        return Decision(tuple(dispatches))

    # --- eviction ----------------------------------------------------------------------------------

    def refresh_values(self, state: NodeState, now: float) -> bool:
        """Value again the models of each serving device whose values were last computed whole
        ``VALUE_REUSE_S / 2`` ago or more, in rounds of slices: :data:`VALUE_SLICE` models of one device per
        call, the models it held when its round began. Returns True while there is more to do (call again, on a
        later turn of the event loop); a device's round ends by counting as a whole computation from its start.

        The controller calls this once a pass's dispatches are on their way, so that the swaps decided within
        the next half window reuse the values. Otherwise the swap that found them ``VALUE_REUSE_S`` old paid for
        every model on the device, and in a tie for the other device's too: on the CI box, 2 devices of 800
        functions and a swap every 33 ms (``bench/scheduler_cost.py``), swap decisions took 0.15 ms at the
        median and 0.9 / 1.8 ms at p90 / p99. In slices, because computed whole here they held the controller's
        loop as long (both devices in one call, 1.4 ms at p99 there; a slice 0.23 ms)."""
        if self.policy != "swapserve":
            return False
        done = False  # one slice per call, of the first device with work
        for d in state.devices:
            if d.out or not d.value_round and now - d.value_cache_at < VALUE_REUSE_S / 2:
                continue
            if done:
                return True
            if not d.value_round and d.value_basis != self.value_basis:  # the cache is of other settings: anew
                self.values(state, d.index, now, whole=True)
                done = True
                continue
            held = _held(d)
            if not d.value_round:
                d.value_round, d.value_round_at = sorted(held, reverse=True), now  # taken from the end
                for f in d.value_cache.keys() - held:  # gone, untouched: a round forgets it all the same
                    del d.value_cache[f]
            part = d.value_round[-VALUE_SLICE:]
            del d.value_round[-VALUE_SLICE:]
            valued = [f for f in part if f in held]
            self._value_into(state, d, valued, now)
            d.value_touched.difference_update(valued)  # valued as they are now: no swap need value them again
            if d.value_round:
                return True
            d.value_cache_at = d.value_round_at  # every model held at the round's start is valued since then
            # Compacted, as clearing it for a whole computation did: a dict that models left (deletions) and
            # joined since is copied item by item, not as one block — +5 µs for each swap's copy of it.
            d.value_cache = dict(d.value_cache)
            done = True
        return False

    def values(self, state: NodeState, device: int, now: float, whole: bool = False) -> dict[str, float]:
        """Worth of keeping each function's bytes on ``device`` (resident, partial or running there); the
        pool evicts the lowest first.

        ``fifo_lru``: ``last_used`` on the device (-inf if never).

        ``swapserve``: +inf for a function with queued requests or a run in flight on any device (an
        in-flight request needs it; a running peer copy may be reading it). Otherwise expected latency
        saved per second per GB kept::

            value = (λ(now) + 1 / (age + 1 s)) × penalty_ms / GB held here

        and with ``slo_values``, ``penalty_ms / slo_ms`` in its place: the share of the function's SLO its next
        request would lose. A swap that adds 2 ms to a request of a 10 ms SLO then weighs as one that adds 8.7 ms
        to one of 43.5 ms (BERT-large's on an H200), where in ms it weighed about a quarter as much: the models of tight
        SLOs stay, the large ones with room in their SLO to swap go first.

        λ(now) is the arrival-rate estimate decayed to now (popularity), corrected for the short history of a
        function the node began counting lately (``rate_since``); 1/(age + 1 s) is the rate implied
        by one use ``age`` seconds ago, ``age`` since the last use here or arrival (recency, which also
        ranks models the rate has forgotten). ``penalty_ms`` is the extra service time a request pays if
        these bytes are gone: a swapped run minus what it costs with them present. Because copy and
        compute are pipelined, a model that computes longer than it copies costs little to drop, and one
        another device holds (a fast NVLink copy) costs less than one only host memory has. Dividing by
        the bytes makes it the right greedy order for freeing space.

        The values are computed whole every ``VALUE_REUSE_S`` (or now, ``whole``; or in slices by
        :meth:`refresh_values`), in between only for the functions touched (:data:`VALUE_REUSE_S`) — which is
        also how a function that joined or left the device is found (whoever changes what a device holds or
        runs touches it); a refresh round starts from what the device holds.
        """
        dev = state.devices[device]
        if self.policy == "fifo_lru":
            return {f: dev.last_used.get(f, -math.inf) for f in sorted(_held(dev))}
        if self.policy == "dedicated":
            return {f: math.inf if state.dedicated.get(f) == device else -math.inf for f in sorted(_held(dev))}
        # In flight anywhere, or queued: never a victim.
        hot = {f for d in state.devices for f in (*d.first_lane, *d.side_running)}
        hot.update(state.nonempty())
        cache = dev.value_cache
        todo: Iterable[str]
        if whole or now - dev.value_cache_at >= VALUE_REUSE_S or dev.value_basis != self.value_basis:
            cache.clear()
            todo = _held(dev)
            dev.value_cache_at, dev.value_basis, dev.value_round = now, self.value_basis, []
        else:
            # A function joins or leaves the device only touched (its residency; a run's start, in apply, or end,
            # in DeviceState.release): the touched ones are valued again or forgotten, not every model checked.
            resident, partial, running = dev.resident, dev.partial, {*dev.first_lane, *dev.side_running}
            todo = [f for f in dev.value_touched if f in resident or f in partial or f in running]
            for f in dev.value_touched.difference(todo):
                cache.pop(f, None)
        dev.value_touched.clear()
        self._value_into(state, dev, todo, now)
        out = dict(cache)  # the device's models, each once
        for f in hot & cache.keys():
            out[f] = math.inf
        return out

    def _value_into(self, state: NodeState, dev: DeviceState, functions: Iterable[str], now: float) -> None:
        """The values of ``functions`` (held on ``dev``) now, into its cache, with :meth:`values`' formula."""
        # Per call, not per model (this runs for every swap and every piece of one, over every model on the
        # device): the link's figures and which models a peer holds whole.
        link = state.link
        h2d, d2d, slowdown = link.h2d(1), link.d2d_GBps if self.peer_copies else None, link.exec_slowdown_copying
        peer_held = (set().union(*(d.resident for d in state.devices if d.index != dev.index and not d.out))
                     if d2d is not None else set())
        fast = max(d2d, h2d) if d2d is not None else h2d
        cache = dev.value_cache
        queues, resident, partial, last_used, halflife = (state.queues, dev.resident, dev.partial, dev.last_used,
                                                          self.rate_halflife_s)
        profiles, unprofiled = state.profiles, ModelProfile(nbytes=0)  # as _profile, one for all unprofiled
        slo = self.slo_values
        for f in functions:
            frac = 1.0 if f in resident else min(max(partial.get(f, 0.0), 0.0), 1.0)
            last = last_used.get(f, -math.inf)
            fq = queues.get(f)
            arrived = fq.last_arrival if fq is not None else None
            if arrived is not None and arrived > last:
                last = arrived
            prof = profiles.get(f) or unprofiled
            held_gb = max(prof.nbytes * frac, 1.0) / 1e9
            rate = rate_since(fq.rate, arrived, now, halflife, fq.counted_since) if arrived is not None else 0.0
            recency = 1.0 / (max(0.0, now - last) + RECENCY_FLOOR_S) if math.isfinite(last) else 0.0
            gbps = fast if f in peer_held else h2d
            penalty = _penalty_ms(prof, gbps * 1e6, slowdown, frac)
            if slo and fq is not None and fq.slo_ms > 0:
                penalty /= fq.slo_ms
            cache[f] = (rate + recency) * penalty / held_gb

    # --- bookkeeping helpers for the controller ----------------------------------------------------

    def apply(self, state: NodeState, decision: Decision, now: float) -> None:
        """Apply ``decision`` to ``state`` as the controller must: remove dispatched and rejected requests
        from their queues; mark each dispatch's lane busy until its expected end, running the function or a
        piece of its swap (the first lane also copying from host until the copy's expected end: host and
        partial sources only, peer copies do not load the host link), and the function last used there now.
        A first-lane dispatch to a busy device (``queue_ahead``) is queued behind the run there
        (:attr:`DeviceState.queued`; :meth:`DeviceState.release` starts it)."""
        gone = {r.request_id for r in decision.rejects}
        for dsp in decision.dispatches:
            gone.update(dsp.request_ids)
        if gone:
            for name in state.nonempty():
                fq = state.queues[name]
                if any(r.id in gone for r in fq.requests):
                    fq.requests = [r for r in fq.requests if r.id not in gone]
        for dsp in decision.dispatches:
            dev = state.devices[dsp.device]
            dev.last_used[dsp.function] = now
            state.touch(dsp.function)
            if dsp.lane:
                dev.side[dsp.lane - 1] = SideLane(now + dsp.expected_ms / 1000.0, dsp.function,
                                                  dsp.source != "resident")
                continue
            copying = dsp.source in ("host", "partial") and dsp.copy_ms > 0
            if dev.busy_until is not None:  # behind the run there (queue_ahead): it starts when that ends
                # As planned, even where that has passed: the planning view counts how overdue the run is from
                # there (``estimate._late``), and would forget it from a start moved to now.
                start = dev.busy_until
                dev.queued = Queued(dsp.function, start, dsp.expected_ms, dsp.copy_ms if copying else 0.0,
                                    dsp.piece_bytes > 0)
                dev.busy_until = start + dsp.expected_ms / 1000.0
                continue
            dev.busy_until = now + dsp.expected_ms / 1000.0
            dev.running = dsp.function
            dev.piece = dsp.piece_bytes > 0
            dev.copying_until = now + dsp.copy_ms / 1000.0 if copying else None

    def observe_completion(self, state: NodeState, function: str, device: int, batch: int, exec_ms: float,
                           swapped: bool, total_ms: float, now: float, copy_ms: float | None = None,
                           fetched: bool = False, beside: int = 0, ahead: bool = False) -> None:
        """Refine ``function``'s profile, or the node's slowdown of runs side by side, from a finished run and
        note its use on ``device``.

        Resident runs alone (``beside`` 0: no run expected in the device's other lanes at its start; pass
        ``Dispatch.beside``) update ``exec_ms[batch]`` (exponentially weighted, weight 0.2; the first run at a
        new batch size replaces the interpolation). Resident runs beside k others update instead the node's
        ``LinkProfile.exec_slowdown_beside[k-1]`` toward ``exec_ms / exec_at(batch)`` (weight
        :data:`BESIDE_WEIGHT`: every function's runs teach it), so that a model's own time stays its time alone
        and the slowdown is counted once. Swapped runs update ``swap_overhead_ms`` toward ``total_ms -
        max(copy, exec × slowdown)`` (``fetched`` by a side lane: ``total_ms - (copy + exec × slowdown)``), with
        ``copy_ms`` as the dispatch expected it (pass ``Dispatch.copy_ms``; default: the whole model over an
        uncontended host link). Each observation is clamped to within ``OUTLIER_FACTOR`` of the current value
        (exec, slowdown) or to [0, total] (overhead). A swap placed ahead (``ahead``: its copies started while
        the run before it executed) teaches nothing: its time is not a swap's. A copy with no run (``batch`` 0:
        a piece of a swap, a prefetch) updates the node's ``LinkProfile.copy_overhead_ms`` toward ``total_ms -
        copy_ms`` (weight :data:`COPY_OVERHEAD_WEIGHT`, clamped within ``OUTLIER_FACTOR``).
        """
        prof = state.profiles.get(function)
        state.touch(function)  # its use, and its profile below
        if 0 <= device < len(state.devices):
            dev = state.devices[device]
            dev.last_used[function] = max(now, dev.last_used.get(function, now))
        if batch < 1:  # a copy with no run: a piece of a swap, or a prefetch
            if copy_ms is not None and total_ms >= 0 and math.isfinite(total_ms):
                self._learn_copy_overhead(state, total_ms - copy_ms)
            return
        if prof is None:
            return
        if not swapped:
            if not (exec_ms > 0 and math.isfinite(exec_ms)):
                return
            if beside > 0 and prof.exec_ms:
                self._learn_beside(state, beside, exec_ms / prof.exec_at(batch))
                return
            old = prof.exec_ms.get(batch)
            if old is None:
                prior = prof.exec_at(batch) if prof.exec_ms else exec_ms
                prof.exec_ms[batch] = _clamped(exec_ms, prior)
            else:
                prof.exec_ms[batch] = _toward(old, exec_ms, EXEC_WEIGHT)
            return
        if ahead or not (total_ms >= 0 and math.isfinite(total_ms)):
            return
        c = copy_ms if copy_ms is not None else prof.nbytes / (state.link.h2d(1) * 1e6)
        slowed = prof.exec_at(batch) * state.link.exec_slowdown_copying * state.link.beside(beside)
        sample = total_ms - (c + slowed if fetched else max(c, slowed))  # a side lane's fetch: copy, then run
        sample = min(max(sample, 0.0), total_ms)
        prof.swap_overhead_ms += EXEC_WEIGHT * (sample - prof.swap_overhead_ms)

    @staticmethod
    def _learn_copy_overhead(state: NodeState, sample_ms: float) -> None:
        """Move the node's overhead of a copy-only dispatch toward ``sample_ms`` (its lane's time past its
        planned copy), clamped to within :data:`OUTLIER_FACTOR` of the current figure: one stalled piece is not
        a new normal."""
        link = state.link
        state.link = replace(link, copy_overhead_ms=_toward(link.copy_overhead_ms, sample_ms, COPY_OVERHEAD_WEIGHT))

    @staticmethod
    def _learn_beside(state: NodeState, others: int, ratio: float) -> None:
        """Move the slowdown of a run beside ``others`` toward ``ratio`` (its time over its time alone); counts
        never measured start from the nearest below (1 for none)."""
        link = state.link
        table = list(link.exec_slowdown_beside)
        while len(table) < others:
            table.append(table[-1] if table else 1.0)
        table[others - 1] = max(1.0, _toward(table[others - 1], ratio, BESIDE_WEIGHT))
        state.link = replace(link, exec_slowdown_beside=tuple(table))

    # --- small helpers -----------------------------------------------------------------------------

    def _view(self, state: NodeState, now: float) -> View:
        return View(state, now, self.peer_copies, self.side_lanes)

    @staticmethod
    def _profile(state: NodeState, function: str) -> ModelProfile:
        """The function's profile; one not profiled yet counts as weightless and 1 ms (ModelProfile's
        default) rather than crashing the controller's loop."""
        return state.profiles.get(function) or ModelProfile(nbytes=0)

    @staticmethod
    def _grace_s(view: View, function: str, prof: ModelProfile, items: int) -> float:
        """Lateness forgiven because the model is on no GPU: its best cold run minus a resident run."""
        best = view.best_case_ms(function, prof, items)
        return 0.0 if best is None else max(0.0, best - prof.exec_at(items)) / 1000.0

    def _drain_s(self, state: NodeState, now: float) -> float:
        """Rough time for the node to work off its queue: the earliest device's wait plus every queued
        batch at its resident speed spread over the devices. Only feeds Retry-After of overload refusals."""
        work_ms = 0.0
        for name in state.nonempty():
            fq = state.queues[name]
            items = sum(r.items for r in fq.requests)
            if items:
                per = max(1, fq.max_batch)
                work_ms += math.ceil(items / per) * self._profile(state, name).exec_at(min(items, per))
        serving = [d for d in state.devices if not d.out]
        waits = [max(0.0, d.busy_until - now) for d in serving if d.busy_until is not None]
        wait = 0.0 if len(waits) < len(serving) else min(waits, default=0.0)
        return wait + work_ms / 1000.0 / max(1, len(serving))
