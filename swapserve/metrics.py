"""The node's Prometheus instruments, in one place, in base units (seconds, bytes).

Each :class:`Metrics` owns its own registry (:mod:`swapserve.instruments`: a series is formatted again only once
it changed, and a scrape yields to the event loop between slices), so that several nodes (and several test
cases) can live in one process. One instance is
shared by the gateway (which records the HTTP side) and the node (which records queueing, swaps, compute,
evictions and SLO misses); ``GET /metrics`` renders it.

Who records what, so nothing is counted twice:

- gateway: :meth:`observe_http` for every HTTP request and :meth:`observe_request` for every infer request that
  named an existing function (whatever its outcome) — in an HTTP front process, through
  :class:`swapserve.fronts.remote.RelayMetrics`, which forwards them here;
- node: :meth:`observe_node_request`, :meth:`observe_queue`, :meth:`observe_compute`, :meth:`observe_swap`,
  :meth:`count_eviction`, :meth:`count_slo_miss`, :meth:`forget_function` when a function is deleted, and a
  collector (:meth:`add_collector`) that sets the gauges from its status just before each scrape.

Every method is thread-safe (a lock per family), so threads may call them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from swapserve.instruments import CONTENT_TYPE, Family, Kind, Registry

if TYPE_CHECKING:
    from swapserve.node.api import NodeStatus
    from swapserve.sandbox.types import SandboxEvent

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
"""Seconds, 1-2.5-5 per decade from 0.1 ms (a resident hit's queue wait) to 10 s (a long cold start); +Inf
catches the rest. 16 buckets keep per-function histograms affordable with hundreds of functions."""

NAMESPACE = "swapserve"

log = logging.getLogger(__name__)


class Metrics:
    """Collectors of one node. Labels: ``function`` (a function name), ``device`` (``cuda:0``, ``cpu``),
    ``code`` (an HTTP status), ``route`` (a route *pattern*, never a raw path, to bound cardinality)."""

    content_type: str = CONTENT_TYPE
    """The ``Content-Type`` of :meth:`render`'s output (Prometheus text exposition format 0.0.4)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.registry = r = Registry()
        self._collectors: list[Callable[[Metrics], None]] = []

        def family(kind: Kind) -> Any:
            def make(name: str, doc: str, labels: tuple[str, ...] | list[str] = ()) -> Family:
                return Family(r, kind, f"{NAMESPACE}_{name}", doc, labels, buckets if kind == "histogram" else ())
            return make

        counter, gauge, histogram = family("counter"), family("gauge"), family("histogram")
        # Counters are named without ``_total``: the exposition appends it.
        self.requests = counter("requests", "Infer requests by function and HTTP status code.",
                                ["function", "code"])
        self.request_seconds = histogram("request_duration_seconds",
                                         "Infer request latency at the gateway (body read to response), by function.",
                                         ["function"])
        self.http_requests = counter("http_requests", "HTTP requests by route pattern, method and status code.",
                                     ["route", "method", "code"])
        self.http_seconds = histogram("http_request_duration_seconds", "HTTP request latency by route pattern.",
                                      ["route"])
        self.node_request_seconds = histogram("node_request_duration_seconds",
                                              "Admission to result inside the node, by function (the gateway's "
                                              "request_duration_seconds adds HTTP, decoding and encoding).",
                                              ["function"])
        self.queue_seconds = histogram("queue_seconds", "Time a request waited before a device started it.",
                                       ["function"])
        self.compute_seconds = histogram("compute_seconds", "Execution time of one (batched) run on a device.",
                                         ["device"])
        self.swap_seconds = histogram("swap_seconds", "Duration of one swapped run (copies overlapped with compute).",
                                      ["device"])
        self.swap_bytes = counter("swap_bytes", "Weight bytes copied onto a device (by swapped runs, prefetches "
                                  "and pieces of swaps).", ["device"])
        self.evictions = counter("evictions", "Models evicted from a device, wholly or partly (a run that takes "
                                 "pages from three models counts three).", ["device"])
        self.swap_pieces = counter("swap_pieces", "Pieces of swaps copied with no run (a long swap with time "
                                   "to spare comes in pieces; other requests go between them).", ["device"])
        self.queued_ahead = counter("queued_ahead", "Runs and pieces of swaps sent to a device's first lane behind "
                                    "the one it runs (the worker starts them when that ends).", ["device"])
        self.side_fetches = counter("side_fetches", "Runs in a device's second lane that brought their model in "
                                    "first (by kernel, beside the first lane's copies).", ["device"])
        self.peer_copies = counter("peer_copies", "Runs that copied their model from another device that held it "
                                   "(device to device: NVLink on GPUs) instead of from host memory.", ["device"])
        self.placed_ahead = counter("placed_ahead", "Runs whose pages were placed (evictions, remaps) while the "
                                    "run before them in the device's first lane executed.", ["device"])
        self.remaps = counter("remaps", "Page slots placements mapped onto other pages on the way to a run (a map "
                              "and an access grant each, driver calls on the run's path).", ["device"])
        self.remap_unmaps = counter("remap_unmaps", "Of those, the slots that first unmapped a page they still "
                                    "mapped (one more driver call each).", ["device"])
        self.worker_restarts = counter("worker_restarts", "Workers started again after theirs died (the device "
                                       "lost, or the process killed).", ["device"])
        self.prefetches = counter("prefetches", "Models copied onto a device ahead of their requests (a handler's "
                                  "sandbox starting while its model comes in).", ["device"])
        self.slo_misses = counter("slo_misses", "Requests that finished after, or were refused for, their SLO.",
                                  ["function"])
        self.pool_used = gauge("pool_used_bytes", "Device weight-pool bytes in use.", ["device"])
        self.pool_size = gauge("pool_size_bytes", "Device weight-pool bytes reserved.", ["device"])
        self.device_serving = gauge("device_serving", "1 while the device serves, 0 while it is out of service "
                                    "(its worker dead or starting again).", ["device"])
        self.host_store_used = gauge("host_store_used_bytes", "Pinned host-store bytes holding models.")
        self.host_store_capacity = gauge("host_store_capacity_bytes", "Pinned host-store capacity.")
        self.queued = gauge("queued_requests", "Requests waiting for a device right now.")
        self.loop_lag = histogram("event_loop_lag_seconds", "How late the gateway/controller event loop ran a timer "
                                  "due every 10 ms: time it spent unable to serve anything (CPU work, collection "
                                  "pauses).")
        self.front_loop_lag = histogram("front_event_loop_lag_seconds", "The same for the HTTP fronts' event loops "
                                        "(serve --fronts), all fronts together.")
        # Handler sandboxes (functions with a handler only).
        self.sandbox_starts = counter("sandbox_starts", "Sandbox process starts by function and outcome "
                                      "(started, start_failed).", ["function", "outcome"])
        self.sandbox_start_seconds = histogram("sandbox_start_seconds", "Cold start of a sandbox: fork, isolation, "
                                               "import and setup(), by function.", ["function"])
        self.sandbox_exits = counter("sandbox_exits", "Sandboxes gone, by function and kind: replaced (crash, "
                                     "timeout, memory limit) or stopped (idle, unload).", ["function", "kind"])
        self.handler_seconds = histogram("handler_duration_seconds", "A handler's run in its sandbox (model calls "
                                         "included), by function.", ["function"])

    # -- gateway ----------------------------------------------------------------------------------------------

    def observe_http(self, route: str, method: str, code: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(code)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def observe_request(self, function: str, code: int, seconds: float) -> None:
        """One infer request of an existing function, whatever its outcome (errors included)."""
        self.requests.labels(function, str(code)).inc()
        self.request_seconds.labels(function).observe(seconds)

    def observe_status(self, status: NodeStatus) -> None:
        """Set every gauge from a node snapshot (the gateway calls this before each scrape, so gauges are
        current without the node pushing them)."""
        for d in status.devices:
            self.set_pool(d.device, d.pool_used_bytes, d.pool_bytes)
            self.device_serving.labels(d.device).set(1 if d.serving else 0)
        self.set_host_store(status.host_store_bytes, status.host_store_capacity)
        self.set_queued(status.queued)

    # -- node -------------------------------------------------------------------------------------------------

    def observe_node_request(self, function: str, seconds: float) -> None:
        """One request completed by the node, from admission to result."""
        self.node_request_seconds.labels(function).observe(seconds)

    def observe_queue(self, function: str, seconds: float) -> None:
        self.queue_seconds.labels(function).observe(seconds)

    def observe_compute(self, device: str, seconds: float) -> None:
        self.compute_seconds.labels(device).observe(seconds)

    def observe_swap(self, device: str, seconds: float, nbytes: int) -> None:
        """One swapped run that copied ``nbytes`` of weights (only the missing pages of a partly resident model)."""
        self.swap_seconds.labels(device).observe(seconds)
        self.count_swap_bytes(device, nbytes)

    def count_swap_bytes(self, device: str, nbytes: int) -> None:
        """Weights copied in, by a run or by a copy with no run (a prefetch, a piece of a swap)."""
        self.swap_bytes.labels(device).inc(nbytes)

    def count_eviction(self, device: str, n: int = 1) -> None:
        self.evictions.labels(device).inc(n)

    def count_worker_restart(self, device: str) -> None:
        self.worker_restarts.labels(device).inc()

    def count_prefetch(self, device: str) -> None:
        self.prefetches.labels(device).inc()

    def count_swap_piece(self, device: str) -> None:
        self.swap_pieces.labels(device).inc()

    def count_queued_ahead(self, device: str) -> None:
        self.queued_ahead.labels(device).inc()

    def count_side_fetch(self, device: str) -> None:
        self.side_fetches.labels(device).inc()

    def count_peer_copy(self, device: str) -> None:
        self.peer_copies.labels(device).inc()

    def count_placed_ahead(self, device: str) -> None:
        self.placed_ahead.labels(device).inc()

    def count_remaps(self, device: str, remaps: int, unmaps: int) -> None:
        self.remaps.labels(device).inc(remaps)
        self.remap_unmaps.labels(device).inc(unmaps)

    def count_slo_miss(self, function: str, n: int = 1) -> None:
        self.slo_misses.labels(function).inc(n)

    def set_pool(self, device: str, used_bytes: int, total_bytes: int) -> None:
        self.pool_used.labels(device).set(used_bytes)
        self.pool_size.labels(device).set(total_bytes)

    def set_host_store(self, used_bytes: int, capacity_bytes: int) -> None:
        self.host_store_used.set(used_bytes)
        self.host_store_capacity.set(capacity_bytes)

    def set_queued(self, n: int) -> None:
        self.queued.set(n)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def observe_front_loop_lag(self, seconds: float) -> None:
        self.front_loop_lag.observe(seconds)

    def observe_sandbox(self, event: SandboxEvent) -> None:
        """One event of a function's sandbox pool (``swapserve.sandbox``'s ``on_event``)."""
        if event.kind == "starting":
            return  # counted once it started (or failed to)
        if event.kind in ("started", "start_failed"):
            self.sandbox_starts.labels(event.function, event.kind).inc()
            if event.kind == "started":
                self.sandbox_start_seconds.labels(event.function).observe(event.seconds)
        elif event.kind == "request":
            self.handler_seconds.labels(event.function).observe(event.seconds)
        else:
            self.sandbox_exits.labels(event.function, event.kind).inc()

    def forget_function(self, function: str) -> None:
        """Drop a deleted function's series, so thousands of short-lived functions don't accumulate."""
        for metric in (self.requests, self.request_seconds, self.node_request_seconds, self.queue_seconds,
                       self.slo_misses, self.sandbox_starts, self.sandbox_start_seconds, self.sandbox_exits,
                       self.handler_seconds):
            for values in [v for v in metric.series if v[:1] == (function,)]:
                metric.remove(*values)

    # -- exposition -------------------------------------------------------------------------------------------

    def add_collector(self, collect: Callable[[Metrics], None]) -> None:
        """Call ``collect(self)`` before each render (to set gauges from a snapshot: the node's status)."""
        self._collectors.append(collect)

    def _collect(self) -> None:
        for collect in self._collectors:
            try:
                collect(self)
            except Exception:  # a failing collector must not hide every other metric
                log.exception("a metrics collector failed")

    def render(self, names: Iterable[str] | None = None) -> bytes:
        """Prometheus text format of every family (or of those named); serve with :attr:`content_type`."""
        self._collect()
        return self.registry.render(names)

    async def render_async(self, names: Iterable[str] | None = None) -> bytes:
        """:meth:`render` from the event loop, which it yields to between slices of series."""
        self._collect()
        return await self.registry.render_async(names)


LOOP_TICK_S = 0.01
"""Period of the event-loop lag probe (:func:`watch_loop`)."""


async def watch_loop(observe: Callable[[float], None], period_s: float = LOOP_TICK_S) -> None:
    """Observe, every ``period_s``, how late the running loop woke up: the time it could serve nothing."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(0.0, loop.time() - due))


__all__ = ["LATENCY_BUCKETS", "LOOP_TICK_S", "Metrics", "watch_loop"]
