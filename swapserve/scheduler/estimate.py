"""What a dispatch would cost: service-time estimates over a planning view of the node.

The scheduler core asks "if function f ran a batch of n items on device d starting at time t, where would
its bytes come from and when would it finish?" many times per decision. :class:`View` answers from a
private copy of the devices' timing and residency, so the core can plan several dispatches (each one
changing what the next sees: a device taken, a host link shared, a model on its way) without touching
the caller's :class:`~swapserve.scheduler.types.NodeState`.

The model of a run (times in ms, all inputs measured by profiling, none assumed):

* resident:  ``exec_at(n)``
* swapped:   ``max(copy, exec_at(n) × exec_slowdown_copying) + swap_overhead_ms`` — copy and compute are
  pipelined, so the slower of the two dominates; only the missing bytes are copied.
* copy from host: the missing bytes at ``h2d(k)``, where k counts the devices on the same host link
  copying at each moment of the copy (this one included): the copy is integrated piecewise over the other
  copies' lifetimes, so a copy that overlaps another only for its first millisecond is not charged the
  contended bandwidth throughout.
* copied from a peer (NVLink): ``copy + exec_at(n) + swap_overhead_ms`` with the copy at ``d2d_GBps``, from a
  device that holds the model whole (lent to the run) — the bytes first, then the resident run (not
  pipelined); it does not load the host link. Chosen only where it finishes before the copy from host.
* side by side: a run with k others running in the device's other lanes at its start takes
  ``exec_at(n) × beside(k)`` (and × ``exec_slowdown_copying`` while the first lane swaps), both measured at
  start.
* fetched by a side lane: ``copy + exec_at(n) + swap_overhead_ms`` with the copy at ``fetch_GBps`` — not
  pipelined (the bytes come first, by kernel, then the resident run), and not queued behind the first
  lane's copies: a kernel's reads share the host link with them (on an H200, 100 MiB took 2.7 ms beside a
  640 MiB swap against 2.5 ms alone).

* a lane past its expected end: a run, piece or copy not answered when it was expected to end is planned to
  free now while it is overdue by :data:`LATE_GRACE_S` or less, and past that to go on as far again as it is
  overdue beyond it (:func:`_late`): the lane frees at ``now + (now − expected end − grace)``, and whatever waits
  behind it that much later. A stalled lane is not free: a GPU stall (one piece of a swap took 26 ms for an
  expected 3 on an H200) otherwise drew the next request there as if it were, where it waited out the stall
  while the device's side lane freed within a millisecond. The grace is what answers ordinarily take past
  their estimate: on two H200s at N = 800 the time a lane still took once overdue was 0.3–0.8 ms at the median
  whether it was 0.5, 1 or 2 ms overdue (``bench/overdue.py``), so "as long again" planned ordinary lateness
  too long and refused requests that would have made it.

Planning is optimistic about memory: a model placed by a planned dispatch is assumed to stay, and nothing
is assumed evicted (eviction spares whatever has queued requests, which is what planning relies on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from swapserve.scheduler.types import DeviceState, LinkProfile, ModelProfile, NodeState, Source

LN2 = math.log(2.0)
RATE_WINDOW_FLOOR_S = 1.0
"""The shortest history a rate is estimated over (:func:`rate_since`): one arrival in a function's first second
counts as 1/s, as the eviction values' recency term rates a use this instant."""

SOURCE_RANK: dict[Source, int] = {"resident": 0, "partial": 1, "peer": 2, "host": 3}
"""Tie-break between equal finish times: the fewer bytes moved, the better (and the less link used)."""

LATE_GRACE_S = 0.002
"""How far past its expected end a lane's work is still planned to free now (:func:`_late`): answers ordinarily
come that late (a lane overdue 0.5–2 ms took 0.3–0.8 ms more at the median on two H200s at N = 800)."""


def copy_ms(nbytes: float, GBps: float) -> float:
    """Milliseconds to move ``nbytes`` at ``GBps`` (10⁹ bytes per second)."""
    return nbytes / (GBps * 1e6) if nbytes > 0 else 0.0


def swapped_ms(copy: float, exec_ms: float, link: LinkProfile, prof: ModelProfile) -> float:
    """A pipelined swapped run: the slower of copy and (slowed) compute, plus the fixed overhead."""
    if copy <= 0.0:
        return exec_ms
    return max(copy, exec_ms * link.exec_slowdown_copying) + prof.swap_overhead_ms


# --- arrival rate ----------------------------------------------------------------------------------

def update_rate(rate: float, last: float | None, now: float, halflife_s: float) -> float:
    """The rate estimate just after an arrival at ``now``.

    An exponentially decaying count of arrivals, ``c(t) = Σ exp(-κ (t - tᵢ))`` with ``κ = ln 2 / halflife``,
    scaled to a rate ``κ·c``: for a Poisson stream of rate λ counted for many half-lives its expectation is λ
    (:func:`rate_since` reads it for a shorter history), each arrival adds κ and the whole decays by half every
    ``halflife_s``. Unlike averaging 1/gap it needs no special case for simultaneous arrivals (a burst) and it
    decays on its own between arrivals (:func:`rate_at`).
    """
    decayed = rate_at(rate, last, now, halflife_s)
    return decayed + LN2 / halflife_s


def rate_at(rate: float, last: float | None, now: float, halflife_s: float) -> float:
    """The estimate stored at ``last`` (the last arrival), decayed to ``now``."""
    if last is None:
        return 0.0
    return rate * 2.0 ** (-max(0.0, now - last) / halflife_s)


def rate_since(rate: float, last: float | None, now: float, halflife_s: float, since: float) -> float:
    """λ(now): the estimate decayed to ``now`` (:func:`rate_at`), of arrivals counted only since ``since``.

    Over a window of ``T = now - since`` the decaying count of a Poisson stream has expectation
    ``λ·(1 - 2^(-T/halflife))``, not λ: a function the node has counted for 10 s (half-life 60 s) would be rated
    at a ninth of its rate, one counted for 40 s at 37 %. Divided by that, the estimate is the stream's rate from
    the first seconds on (``count / T`` while ``T`` is short) and the plain decaying count once ``T`` is many
    half-lives (``since`` = -inf: no correction). ``T`` is taken as at least :data:`RATE_WINDOW_FLOOR_S`.
    """
    seen = 1.0 - 2.0 ** (-max(now - since, RATE_WINDOW_FLOOR_S) / halflife_s)
    return rate_at(rate, last, now, halflife_s) / seen


# --- planning --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Estimate:
    """One candidate placement of one batch. Treated as a value, never changed once made; not a frozen dataclass
    because a decision makes several per request (a frozen one cost 1.9 µs to make on the CI box, this 0.5)."""

    device: int
    source: Source
    peer: int | None
    start: float
    """Seconds (clock time) at which the dispatch would start."""
    copy_ms: float
    """Expected copy time (0 for resident)."""
    total_ms: float
    """Expected time from start to completion."""
    lane: int = 0
    """1, 2, ...: one of the device's side lanes (a resident run beside whatever its other lanes do)."""
    beside: int = 0
    """Runs in the device's other lanes at its start (what slows it: :meth:`View.beside`)."""

    @property
    def finish(self) -> float:
        return self.start + self.total_ms / 1000.0

    def key(self, go_now: bool) -> tuple[float, int, int, int, int]:
        """Order of preference: earliest finish, then a dispatch that may be sent now (a free lane, or behind
        a first lane's run, queued ahead) over one that waits for a lane to free or a model to land, then
        fewer bytes moved, then a side lane (which keeps the first lane, the only one that swaps, free), then
        the lowest device index (so every tie resolves the same way). Devices that tie on all but the index
        are first told apart by what their pools would give up for the bytes (``Scheduler._tie_break``)."""
        return (self.finish, 0 if go_now else 1, SOURCE_RANK[self.source], 0 if self.lane else 1, self.device)


def _late(now: float, end: float) -> float:
    """How much later than planned a lane's work ends, its current run expected to end at ``end``: nothing
    while that is ahead; once it has passed, to ``now`` while it is :data:`LATE_GRACE_S` overdue or less, and
    past that as far after ``now`` as it is overdue beyond the grace (the longer a stall has lasted, the longer it
    is planned to last)."""
    overdue = now - end
    return overdue + max(0.0, overdue - LATE_GRACE_S) if overdue > 0 else 0.0


def _first_late(d: DeviceState, now: float) -> float:
    """:func:`_late` for ``d``'s first lane: its running dispatch ends where the one queued behind it starts."""
    assert d.busy_until is not None
    return _late(now, d.queued.start if d.queued is not None else d.busy_until)


def _incoming(d: DeviceState, now: float, late: float) -> dict[str, float]:
    """The models ``d``'s first lane is bringing in, each with when it is there: the running one's at that run's
    end (the start of the dispatch queued behind it, if any), the queued one's at the lane's; both ``late``
    (:func:`_first_late`) later than planned."""
    out: dict[str, float] = {}
    if d.running is not None and not d.idle and not d.piece:
        assert d.busy_until is not None
        out[d.running] = max(now, (d.queued.start if d.queued is not None else d.busy_until) + late)
    if d.queued is not None and not d.queued.piece:
        assert d.busy_until is not None
        out.setdefault(d.queued.function, max(now, d.busy_until + late))
    return out


@dataclass
class _Copy:
    device: int
    start: float
    end: float


class View:
    """A planning copy of the node's devices: when each is free, what each holds or is receiving, and
    which host copies are in flight (for contention)."""

    def __init__(self, state: NodeState, now: float, peers: bool = False, side_lanes: int | None = None):
        """``peers``: a model may be copied from a device that holds it (where ``link.d2d_GBps`` is measured);
        ``side_lanes``: how many of each device's side lanes new runs may take (None: all); the others still
        count as runs beside."""
        self.link = state.link
        self.d2d_GBps = state.link.d2d_GBps if peers else None
        self.now = now
        # Built in one pass over the devices (a decision builds a view for every request: a comprehension per
        # list cost more than their contents on a node of one or two devices).
        # A device out of service fits nothing, never frees and holds nothing (no run there, no copy from it).
        self.serving: list[bool] = []
        self.pool: list[int] = []
        self.idle: list[bool] = []
        self.free_at: list[float] = []
        # When each side lane frees, whether it is free now, and the model its run brings in (if any): per
        # device, per side lane (lane i at i - 1).
        self.side_free_at: list[list[float]] = []
        self.side_idle: list[list[bool]] = []
        self.side_incoming: list[list[str | None]] = []
        self.side_lanes: list[int] = []
        # The devices' own sets, not copies (hundreds of models each, on every request): a plan never
        # changes what is partly resident, and :meth:`commit` replaces a device's resident set, never adds to it.
        self.resident: list[set[str]] = []
        self.partial: list[dict[str, float]] = []
        # The models a busy first lane runs are on the device once their run ends (the worker keeps what it
        # loaded), except those of pieces of a swap; a side lane's fetch is there once that lane frees.
        self.incoming: list[dict[str, float]] = []
        # ``copying_until`` is the end of a host→device copy (peer copies do not use the host link); a
        # dispatch queued behind the first lane's run copies after it.
        self.copies: list[_Copy] = []
        queued_copies: list[_Copy] = []
        for d in state.devices:
            out, busy_until, side = d.out, d.busy_until, d.side
            self.serving.append(not out)
            self.pool.append(d.pool_bytes)
            self.idle.append(d.idle)
            late = 0.0 if busy_until is None else _first_late(d, now)
            self.free_at.append(math.inf if out else now if busy_until is None else max(now, busy_until + late))
            side_free_at: list[float] = []
            side_idle: list[bool] = []
            side_incoming: list[str | None] = []
            for ln in side:  # one loop for the three (as over the devices)
                until = ln.until
                side_free_at.append(now if until is None else max(now, until + _late(now, until)))
                side_idle.append(until is None)
                side_incoming.append(None if out or not ln.fetching else ln.running)
            self.side_free_at.append(side_free_at)
            self.side_idle.append(side_idle)
            self.side_incoming.append(side_incoming)
            self.side_lanes.append(0 if out else len(side) if side_lanes is None else min(side_lanes, len(side)))
            self.resident.append(set() if out else d.resident)
            self.partial.append({} if out else d.partial)
            self.incoming.append({} if out or busy_until is None else _incoming(d, now, late))
            if d.copying_until is not None and d.copying_until > now:
                self.copies.append(_Copy(d.index, now, d.copying_until))
            if (q := d.queued) is not None and q.copy_ms > 0:
                queued_copies.append(_Copy(d.index, q.start + late, q.start + late + q.copy_ms / 1000.0))
        self.copies += queued_copies
        self.n = len(self.pool)
        self._made: dict[tuple[Any, ...], Estimate | None] = {}
        """The estimates made since the plan last changed (:meth:`commit`, :meth:`prune`), by their arguments: a
        decision asks for each twice, triaging a queue and placing its batch (~half of a resident request's
        decision, 53 µs on the CI box on two devices). A view plans with one profile per function."""

    def _group(self, device: int) -> int:
        groups = self.link.h2d_link
        return groups[device] if groups is not None and device < len(groups) else 0

    def holds(self, function: str, device: int, at: float) -> bool:
        """Whether the whole model is on ``device`` at time ``at`` (or will be, once its current run ends)."""
        if function in self.resident[device]:
            return True
        if any(f == function and at >= t for f, t in zip(self.side_incoming[device], self.side_free_at[device])):
            return True
        return (lands := self.incoming[device].get(function)) is not None and at >= lands

    def beside(self, device: int, at: float, lane: int) -> tuple[int, float]:
        """The runs of ``device``'s other lanes still going at ``at`` beside a run in ``lane``, and the
        execution slowdown they cause (measured per count), with a first lane's copy."""
        first = lane != 0 and self.free_at[device] > at
        others = first + len([i for i, t in enumerate(self.side_free_at[device], 1) if i != lane and t > at])
        return others, self.link.beside(others) * (self.link.exec_slowdown_copying if first else 1.0)

    def partial_fraction(self, function: str, device: int) -> float:
        """The share of a partly resident model's bytes on ``device`` (0 for none), in [0, 1]."""
        return min(max(self.partial[device].get(function, 0.0), 0.0), 1.0)

    def fits(self, prof: ModelProfile, device: int) -> bool:
        return self.serving[device] and prof.nbytes <= self.pool[device]

    def host_copy_ms(self, device: int, nbytes: float, start: float) -> float:
        """Copy ``nbytes`` from host to ``device`` starting at ``start``, sharing the host link with the
        other copies in flight on the same link for as long as each lasts."""
        if nbytes <= 0:
            return 0.0
        g = self._group(device)
        others = [c for c in self.copies if c.device != device and c.end > start and self._group(c.device) == g]
        events = sorted({x for c in others for x in (c.start, c.end) if x > start})
        t, left = start, float(nbytes)
        for nxt in events + [math.inf]:
            k = 1 + sum(1 for c in others if c.start <= t < c.end)
            bps = self.link.h2d(k) * 1e9
            if left <= bps * (nxt - t):
                return (t - start + left / bps) * 1000.0
            left -= bps * (nxt - t)
            t = nxt
        raise AssertionError("unreachable: the last segment is unbounded")

    def peer_for(self, function: str, device: int, at: float) -> int | None:
        """A device that holds the whole model at ``at`` to copy from: idle ones first (a busy peer's run
        competes for its memory bandwidth), then the lowest index."""
        if self.d2d_GBps is None:
            return None
        peers = [p for p in range(self.n) if p != device and self.holds(function, p, at)]
        return min(peers, key=lambda p: (not self.idle[p], p), default=None)

    def estimate(self, function: str, prof: ModelProfile, items: int, device: int, start: float,
                 allow_peer: bool = True) -> Estimate | None:
        """The cost of running ``items`` of ``function`` on ``device`` from ``start``; None if the model
        cannot fit the device's pool at all."""
        key = (function, items, device, start, allow_peer)
        if key not in self._made:
            self._made[key] = self._estimate(function, prof, items, device, start, allow_peer)
        return self._made[key]

    def _estimate(self, function: str, prof: ModelProfile, items: int, device: int, start: float,
                  allow_peer: bool) -> Estimate | None:
        if not self.fits(prof, device):
            return None
        others, slowdown = self.beside(device, start, 0)
        exec_ms = prof.exec_at(items) * slowdown
        if self.holds(function, device, start):
            return Estimate(device, "resident", None, start, 0.0, exec_ms, beside=others)
        frac = self.partial_fraction(function, device)
        missing = prof.nbytes * (1.0 - frac)
        source: Source = "partial" if frac > 0.0 else "host"
        copy = self.host_copy_ms(device, missing, start)
        p = self.peer_for(function, device, start) if allow_peer else None
        if p is not None:
            assert self.d2d_GBps is not None
            via_peer = copy_ms(missing, self.d2d_GBps)
            if via_peer + exec_ms <= swapped_ms(copy, exec_ms, self.link, prof) - prof.swap_overhead_ms:
                # From a peer the bytes come first, then the run (not pipelined; no copy beside it).
                return Estimate(device, "peer", p, start, via_peer, via_peer + exec_ms + prof.swap_overhead_ms,
                                beside=others)
        return Estimate(device, source, None, start, copy, swapped_ms(copy, exec_ms, self.link, prof), beside=others)

    def side_lane(self, device: int) -> int | None:
        """The side lane a run on ``device`` would take: the earliest to free (one overdue past the grace frees
        later, :func:`_late`; a free one before one whose run is due to end now), then the lowest; None if the
        device has none (the lanes of a device are alike)."""
        n = self.side_lanes[device]
        if not n:
            return None
        at, idle = self.side_free_at[device], self.side_idle[device]
        best = 0
        for i in range(1, n):  # a loop, not min() with a key: one lane is the common case (serve --lanes 2)
            if (at[i], not idle[i]) < (at[best], not idle[best]):
                best = i
        return 1 + best

    def side_idle_now(self, device: int, lane: int) -> bool:
        """Whether side ``lane`` of ``device`` is free now (no run of the node's nor of this plan)."""
        return self.side_idle[device][lane - 1]

    def side_estimate(self, function: str, prof: ModelProfile, items: int, device: int,
                      start: float, fetch: bool = False) -> Estimate | None:
        """A run of ``items`` in one of ``device``'s side lanes (:meth:`side_lane`), from ``start`` or when the
        lane frees: a resident run, or with ``fetch`` (and a measured ``fetch_GBps``) one that brings its
        missing bytes in first; None if the device has no side lane or the model is not wholly there by then
        (and may not be fetched). A model the first lane is bringing in is waited for: the run starts once it
        is there (a side lane never fetches what another lane has in flight). It runs at the measured slowdown
        of the runs beside it (:meth:`beside`)."""
        key = (function, items, device, start, fetch, "side")
        if key not in self._made:
            self._made[key] = self._side_estimate(function, prof, items, device, start, fetch)
        return self._made[key]

    def _side_estimate(self, function: str, prof: ModelProfile, items: int, device: int, start: float,
                       fetch: bool) -> Estimate | None:
        lane = self.side_lane(device)
        if lane is None:
            return None
        at = max(start, self.side_free_at[device][lane - 1])
        if (lands := self.incoming[device].get(function)) is not None and lands > at:
            at = lands
        others, slowdown = self.beside(device, at, lane)
        exec_ms = prof.exec_at(items) * slowdown
        if self.holds(function, device, at):
            return Estimate(device, "resident", None, at, 0.0, exec_ms, lane=lane, beside=others)
        if not fetch or self.link.fetch_GBps is None or not self.fits(prof, device):
            return None
        frac = self.partial_fraction(function, device)
        copy = copy_ms(prof.nbytes * (1.0 - frac), self.link.fetch_GBps)
        return Estimate(device, "partial" if frac > 0.0 else "host", None, at, copy,
                        copy + exec_ms + prof.swap_overhead_ms, lane=lane, beside=others)

    def side_estimates(self, function: str, prof: ModelProfile, items: int, start: float,
                       fetch: bool = False) -> list[Estimate]:
        return [e for d in range(self.n) if (e := self.side_estimate(function, prof, items, d, start, fetch))]

    def earliest_free(self) -> float:
        """When the first lane of any device, or a side lane new runs may take, frees."""
        return min([*self.free_at, *(t for d, ts in enumerate(self.side_free_at) for t in ts[:self.side_lanes[d]])])

    def candidates(self, function: str, prof: ModelProfile) -> list[int]:
        """The devices worth evaluating for a batch started when each frees: those holding the model whole
        or in part, and on each host link the earliest-free device that fits it. Every other device would
        copy the same bytes over the same link (or the same peer) later, so it cannot finish first."""
        picked: set[int] = set()
        first: dict[int, int] = {}
        for d in range(self.n):
            if not self.fits(prof, d):
                continue
            if function in self.resident[d] or function in self.incoming[d] or function in self.partial[d]:
                picked.add(d)
                continue
            g = self._group(d)
            if g not in first or self.free_at[d] < self.free_at[first[g]]:
                first[g] = d
        return sorted(picked | set(first.values()))

    def worst_case_ms(self, prof: ModelProfile, items: int) -> float:
        """An upper bound on any estimate of this batch: the whole model over the slowest host bandwidth
        ever measured (every device copying at once)."""
        return swapped_ms(copy_ms(prof.nbytes, min(self.link.h2d_GBps)), prof.exec_at(items), self.link, prof)

    def best_case_ms(self, function: str, prof: ModelProfile, items: int) -> float | None:
        """The fastest this batch could run from the models' current placement with every device free and
        no other copy in flight (None if it fits no device). Used for the cold-start grace."""
        if any(function in r or function in inc for r, inc in zip(self.resident, self.incoming)):
            return prof.exec_at(items)
        best = None
        for d in range(self.n):
            if not self.fits(prof, d):
                continue
            frac = self.partial_fraction(function, d)
            c = copy_ms(prof.nbytes * (1.0 - frac), self.link.h2d(1))
            t = swapped_ms(c, prof.exec_at(items), self.link, prof)
            best = t if best is None else min(best, t)
        return best

    def commit(self, est: Estimate, function: str, whole: bool = True) -> None:
        """Plan ``est``: its device is busy until it finishes, then holds the model (unless not ``whole``:
        a piece of a swap); a host copy joins the copies that later plans share the link with."""
        self._made.clear()
        d = est.device
        if est.lane:
            i = est.lane - 1
            if (came := self.side_incoming[d][i]) is not None:  # the lane's fetch ahead has ended by then
                self.resident[d] = self.resident[d] | {came}
            self.side_free_at[d][i], self.side_idle[d][i] = est.finish, False
            self.side_incoming[d][i] = function if est.source != "resident" else None
            return
        if self.incoming[d]:  # the runs before this one have ended by the time this starts (a new set: see __init__)
            self.resident[d] = self.resident[d] | self.incoming[d].keys()
        self.incoming[d] = {function: est.finish} if est.source != "resident" and whole else {}
        self.free_at[d] = est.finish
        self.idle[d] = False
        if est.source in ("host", "partial") and est.copy_ms > 0.0:
            self.copies.append(_Copy(d, est.start, est.start + est.copy_ms / 1000.0))

    def prune(self) -> None:
        """Forget copies that end before any device could start anything (bounds long simulations)."""
        self._made.clear()
        horizon = min(self.free_at, default=self.now)  # side lanes start no copies
        self.copies = [c for c in self.copies if c.end > horizon]
