"""The scheduler's view of the node, and its decisions. Plain data: no processes, no clocks, no GPU.

The controller owns a :class:`NodeState`, keeps it current (arrivals, completions, residency reported by
workers) and asks the pure scheduler core for decisions; the unit tests build states by hand and drive
the same core with a fake clock. Times are in seconds (``now``, deadlines) except where a name says ``_ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Source = Literal["resident", "partial", "peer", "host"]
"""Where a dispatched model's missing bytes come from: none (resident), some from host (partial), a peer
GPU over NVLink, or host memory over PCIe."""

Policy = Literal["swapserve", "fifo_lru", "dedicated"]
"""``swapserve``: deadline order, batching, placement by expected finish with contention, early refusal,
eviction by expected reuse. ``fifo_lru``: arrival order, no batching, first idle device, LRU eviction, never
refuses a request for lateness (the baseline that shows the scheduler's worth). ``dedicated``: only the
functions given a device in :attr:`NodeState.dedicated` are served, each only there (its model stays
resident); the others are refused (the baseline of one GPU slice per model)."""


@dataclass(frozen=True)
class LinkProfile:
    """Measured on the machine at start (``Node._profile_link``), not assumed."""

    h2d_GBps: tuple[float, ...]
    """Pinned host→device bandwidth per device when k devices copy at once: index k-1."""
    d2d_GBps: float | None = None
    """Device→device bandwidth between peers (NVLink), None where peers cannot copy directly."""
    exec_slowdown_copying: float = 1.0
    """Execution time multiplier while the same device copies (measured; ≥ 1)."""
    exec_slowdown_beside: tuple[float, ...] = ()
    """Execution time multiplier of a run with k others running beside it on the same device (its other
    lanes): index k-1 (measured at start for as many lanes as the devices have; ≥ 1; beyond the last, the
    last). Empty: not measured, 1."""
    fetch_GBps: float | None = None
    """Host→device bandwidth of a side lane's fetch (a copy by kernel, which shares the host link with the
    first lane's copy engine copies instead of queueing behind them), alone; None: side lanes run resident
    models only."""
    h2d_link: tuple[int, ...] | None = None
    """Per device, the id of the host link it copies over (root port / PCIe switch): only devices with the
    same id contend, so k in :meth:`h2d` counts those. None: all devices share one link (the safe default
    where the topology was not probed)."""
    copy_overhead_ms: float = 1.0
    """What a dispatch that only copies (a piece of a swap, a prefetch) holds its lane beyond its copy, from the
    lane taking it up to its answer read: the command's way there and back, the pages' mapping, the copy's
    sync. Learned from those dispatches (``Scheduler.observe_completion``); 1.0 until one has answered. On two
    H200s pieces of 3.0 ms planned took 1.57 ms more at the median (815 pieces, session 31)."""

    def h2d(self, concurrent: int) -> float:
        """Per-device bandwidth with ``concurrent`` devices copying (this one included)."""
        k = max(1, concurrent)
        return self.h2d_GBps[min(k, len(self.h2d_GBps)) - 1]

    def beside(self, others: int) -> float:
        """Execution time multiplier with ``others`` runs beside (0: alone)."""
        if others <= 0 or not self.exec_slowdown_beside:
            return 1.0
        return self.exec_slowdown_beside[min(others, len(self.exec_slowdown_beside)) - 1]


@dataclass
class ModelProfile:
    """What a run of a model costs. Seeded at deploy by a resident run at each batch size the model runs at
    (the worker's ``Prepare``), refined from completions. The node gives every function of one model structure
    the same profile object (``Node._profile``), so that each learns from all their runs."""

    nbytes: int
    exec_ms: dict[int, float] = field(default_factory=dict)
    """Resident execution time by batch size (observed); use :meth:`exec_at` to read."""
    swap_overhead_ms: float = 0.3
    """Fixed cost of a swapped run beyond max(copy, exec) (launch, first chunk, tail compute)."""

    def exec_at(self, batch: int) -> float:
        """Execution time at ``batch``, interpolated linearly from the nearest observed sizes."""
        if not self.exec_ms:
            return 1.0
        if batch in self.exec_ms:
            return self.exec_ms[batch]
        sizes = sorted(self.exec_ms)
        lo = max((b for b in sizes if b < batch), default=sizes[0])
        hi = min((b for b in sizes if b > batch), default=sizes[-1])
        if lo == hi:
            return self.exec_ms[lo] * (batch / lo if batch > lo else 1.0)
        t = (batch - lo) / (hi - lo)
        return self.exec_ms[lo] + t * (self.exec_ms[hi] - self.exec_ms[lo])


@dataclass
class Request:
    id: str
    function: str
    arrival: float
    deadline: float
    items: int = 1
    """Batch size the request itself carries."""


@dataclass
class FunctionQueue:
    function: str
    slo_ms: float
    max_batch: int
    max_queue: int
    late_policy: Literal["refuse", "serve"] = "refuse"
    requests: list[Request] = field(default_factory=list)
    """Waiting requests, in deadline order (deadline = arrival + SLO, so also arrival order)."""
    rate: float = 0.0
    """Arrival rate estimate (requests/s), exponentially weighted (``estimate.update_rate``)."""
    last_arrival: float | None = None
    counted_since: float = -math.inf
    """When arrivals began to be counted in ``rate`` (the node's clock: when it added the function); the rate
    read as λ is corrected for so short a history (``estimate.rate_since``). -inf: long enough ago to need none."""


@dataclass(frozen=True)
class Queued:
    """A first-lane dispatch sent behind the run in progress there: the worker starts it as soon as that run
    ends, with no round trip through the controller between them."""

    function: str
    start: float
    """Expected start: the expected end of the run ahead of it (past, where that run is overdue)."""
    expected_ms: float
    copy_ms: float
    """Expected host→device copy part (0 when nothing comes over the host link)."""
    piece: bool


@dataclass
class SideLane:
    """One of a device's side lanes (1, 2, ...): resident models' runs, beside the first lane and each other."""

    until: float | None = None
    """Expected end of its run; None when it is free."""
    running: str | None = None
    fetching: bool = False
    """Whether its run brings its model in first (the model is there when it ends)."""


@dataclass
class DeviceState:
    index: int
    pool_bytes: int
    resident: set[str] = field(default_factory=set)
    """Functions whose model is fully on this device (as the worker last reported)."""
    partial: dict[str, float] = field(default_factory=dict)
    """Functions partly on this device: fraction of their bytes present."""
    busy_until: float | None = None
    """Expected end of the work dispatched to its first lane (``queued`` included); None when idle."""
    running: str | None = None
    piece: bool = False
    """Whether what ``running`` does is a piece of its model's swap (the model still partly missing
    when it ends) rather than a run or a whole prefetch (the model there when it ends)."""
    copying_until: float | None = None
    """Expected end of its in-flight host→device copy, if any."""
    queued: Queued | None = None
    """The dispatch waiting behind ``running`` in the first lane, if any (``Scheduler(queue_ahead=True)``)."""
    last_used: dict[str, float] = field(default_factory=dict)
    """When each function last ran here (for LRU)."""
    used_bytes: int = 0
    """Of ``pool_bytes``, what its models' pages take, as the worker last reported."""
    side: list[SideLane] = field(default_factory=list)
    """The device's side lanes (lane i is ``side[i - 1]``), which run resident models beside the first lane
    (the only one that swaps models in; ``busy_until``, ``running`` and ``copying_until`` are its state) and
    each other. Empty: one lane."""
    out: bool = False
    """Out of service (its worker died, or is starting again): nothing is sent to it, nothing is copied from
    it, and it never looks idle; the other devices serve meanwhile."""
    # The scheduler's cache of eviction values (``Scheduler.values``): not the device's state, so not compared.
    value_cache: dict[str, float] = field(default_factory=dict, compare=False)
    """The eviction value of each function here, as last computed."""
    value_cache_at: float = field(default=-math.inf, compare=False)
    """When the cache was last computed whole (since then only for the functions touched)."""
    value_touched: set[str] = field(default_factory=set, compare=False)
    """Functions whose value here may have changed since, or that joined or left the device
    (:meth:`NodeState.touch`)."""
    value_basis: tuple[bool, bool] = field(default=(False, False), compare=False)
    """The settings the cache was computed under: ``peer_copies`` and ``slo_values`` (``Scheduler.value_basis``)."""
    value_round: list[str] = field(default_factory=list, compare=False)
    """The functions still to be valued in the refresh under way (``Scheduler.refresh_values``, in slices)."""
    value_round_at: float = field(default=-math.inf, compare=False)
    """When that refresh began: once it ends, the cache's values are all from then or later."""

    @property
    def idle(self) -> bool:
        return self.busy_until is None and not self.out

    @property
    def side_running(self) -> tuple[str, ...]:
        """The functions its side lanes run."""
        return tuple(ln.running for ln in self.side if ln.running is not None)

    @property
    def first_lane(self) -> tuple[str, ...]:
        """The functions the first lane runs or will run next (none when it is idle)."""
        return tuple(f for f in (self.running, self.queued.function if self.queued else None) if f is not None)

    def release(self, lane: int, now: float, queued: bool = False) -> None:
        """A lane's dispatch ended: a side lane's; the first lane's running one, whose queued successor (if
        any) starts now; or, with ``queued``, the successor itself (it failed before it ran). What stops running
        here is marked touched (``value_touched``): its eviction value here is computed again, or forgotten."""
        if lane:
            if (f := self.side[lane - 1].running) is not None:
                self.value_touched.add(f)
            self.side[lane - 1] = SideLane()
            return
        q = self.queued
        self.queued = None
        if queued:
            assert q is not None, "no dispatch queued behind the first lane"
            self.value_touched.add(q.function)
            self.busy_until = q.start
            return
        if self.running is not None:
            self.value_touched.add(self.running)
        if q is not None:
            self.running, self.piece = q.function, q.piece
            self.busy_until = now + q.expected_ms / 1000.0
            self.copying_until = now + q.copy_ms / 1000.0 if q.copy_ms > 0 else None
        else:
            self.busy_until = self.running = self.copying_until = None
            self.piece = False


@dataclass
class NodeState:
    devices: list[DeviceState]
    queues: dict[str, FunctionQueue]
    profiles: dict[str, ModelProfile]
    link: LinkProfile
    max_queued: int = 4096
    """Node-wide bound on queued requests; beyond it arrivals get 503."""
    dedicated: dict[str, int] = field(default_factory=dict)
    """Under policy ``dedicated``: the device each served function is pinned to."""
    waiting: set[str] = field(default_factory=set)
    """Functions that may have queued requests: every non-empty queue's name is here (whoever adds to a
    queue calls :meth:`mark_waiting`); names of emptied queues leave at the next :meth:`nonempty`. Keeps the
    per-request passes O(functions with work), not O(functions deployed) — hundreds of them idle."""

    def mark_waiting(self, function: str) -> None:
        self.waiting.add(function)

    def touch(self, function: str) -> None:
        """What a function's eviction values rest on changed — its use or arrival, its share of a device (on
        any: a copy from a peer is cheaper; joining or leaving one), a run of it starting or ending, its
        profile: whoever changes those calls this, so that the values are computed again for it, or forgotten
        where it is gone, not for every model on a device at every swap."""
        for d in self.devices:
            d.value_touched.add(function)

    def forget_values(self) -> None:
        """Every device's eviction values are computed whole at the next swap (the models changed)."""
        for d in self.devices:
            d.value_cache_at, d.value_round = -math.inf, []

    def nonempty(self) -> list[str]:
        """Names of the functions with queued requests, sorted."""
        names = [n for n in self.waiting if (q := self.queues.get(n)) is not None and q.requests]
        if len(names) != len(self.waiting):
            self.waiting = set(names)
        names.sort()
        return names

    @property
    def queued(self) -> int:
        return sum(len(q.requests) for n in self.waiting if (q := self.queues.get(n)) is not None)


@dataclass(frozen=True)
class Dispatch:
    device: int
    function: str
    request_ids: tuple[str, ...]
    source: Source
    expected_ms: float
    """Expected time from dispatch to completion."""
    peer: int | None = None
    """The device to copy from when ``source == "peer"``."""
    copy_ms: float = 0.0
    """Expected copy part of ``expected_ms`` (0 when resident): the controller sets the device's
    ``copying_until`` from it for host and partial sources (peer copies do not load the host link)."""
    values: dict[str, float] = field(default_factory=dict)
    """Eviction values for the worker's page pool (functions on that device; lowest evicted first)."""
    lane: int = 0
    """0: the device's first lane (swaps and resident runs); 1, 2, ...: a side lane (resident runs, and
    fetches: a model brought in by kernel and then run, when ``source`` is not ``"resident"``)."""
    beside: int = 0
    """Runs expected in the device's other lanes when it starts (its estimate counted their slowdown;
    :meth:`Scheduler.observe_completion` learns the slowdown from what it took)."""
    piece_bytes: int = 0
    """A piece of a swap: copy about this many of the model's missing bytes (whole pages, in first-use
    order) and run nothing; the requests stay queued (``request_ids`` is empty). 0: a run, or a whole
    prefetch when there are no requests."""


@dataclass(frozen=True)
class Reject:
    request_id: str
    status: Literal[429, 503]
    retry_after: float
    """Seconds."""
    reason: str


@dataclass(frozen=True)
class Decision:
    dispatches: tuple[Dispatch, ...] = ()
    rejects: tuple[Reject, ...] = ()
    """Queued requests dropped because they can no longer meet their deadline (policy ``refuse``)."""
