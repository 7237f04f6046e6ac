"""The node's Prometheus instruments, in one place, in base units (seconds, bytes).

Each :class:`Metrics` owns its own ``CollectorRegistry`` rather than the process-global one, so that several
nodes (and several test cases) can live in one process without "duplicated timeseries" errors. One instance is
shared by the gateway (which records the HTTP side) and the node (which records queueing, swaps, compute,
evictions and SLO misses); ``GET /metrics`` renders it.

Who records what, so nothing is counted twice:

- gateway: :meth:`observe_http` for every HTTP request, :meth:`observe_request` for every infer request that
  named an existing function (whatever its outcome), and :meth:`observe_status` just before each scrape;
- node: :meth:`observe_node_request`, :meth:`observe_queue`, :meth:`observe_compute`, :meth:`observe_swap`,
  :meth:`count_eviction`, :meth:`count_slo_miss`, optionally the gauge setters, and :meth:`forget_function` when
  a function is deleted. :meth:`observe` takes the same calls keyed by an event name, for callers that forward
  events generically.

Every method is thread-safe (prometheus_client locks per child), so GPU worker threads may call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class Metrics:
    """Collectors of one node. Labels: ``function`` (a function name), ``device`` (``cuda:0``, ``cpu``),
    ``code`` (an HTTP status), ``route`` (a route *pattern*, never a raw path, to bound cardinality)."""

    content_type: str = CONTENT_TYPE_LATEST
    """The ``Content-Type`` of :meth:`render`'s output (Prometheus text exposition format 0.0.4)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r, ns = self.registry, NAMESPACE
        # Counters are named without ``_total``: prometheus_client appends it on exposition.
        self.requests = Counter("requests", "Infer requests by function and HTTP status code.",
                                ["function", "code"], namespace=ns, registry=r)
        self.request_seconds = Histogram("request_duration_seconds",
                                         "Infer request latency at the gateway (body read to response), by function.",
                                         ["function"], namespace=ns, registry=r, buckets=buckets)
        self.http_requests = Counter("http_requests", "HTTP requests by route pattern, method and status code.",
                                     ["route", "method", "code"], namespace=ns, registry=r)
        self.http_seconds = Histogram("http_request_duration_seconds", "HTTP request latency by route pattern.",
                                      ["route"], namespace=ns, registry=r, buckets=buckets)
        self.node_request_seconds = Histogram("node_request_duration_seconds",
                                              "Admission to result inside the node, by function (the gateway's "
                                              "request_duration_seconds adds HTTP, decoding and encoding).",
                                              ["function"], namespace=ns, registry=r, buckets=buckets)
        self.queue_seconds = Histogram("queue_seconds", "Time a request waited before a device started it.",
                                       ["function"], namespace=ns, registry=r, buckets=buckets)
        self.compute_seconds = Histogram("compute_seconds", "Execution time of one (batched) run on a device.",
                                         ["device"], namespace=ns, registry=r, buckets=buckets)
        self.swap_seconds = Histogram("swap_seconds", "Duration of one swap-in (copies overlapped with compute).",
                                      ["device"], namespace=ns, registry=r, buckets=buckets)
        self.swap_bytes = Counter("swap_bytes", "Weight bytes copied onto a device by swap-ins.",
                                  ["device"], namespace=ns, registry=r)
        self.evictions = Counter("evictions", "Models (wholly or partly) evicted from a device.",
                                 ["device"], namespace=ns, registry=r)
        self.slo_misses = Counter("slo_misses", "Requests that finished after, or were refused for, their SLO.",
                                  ["function"], namespace=ns, registry=r)
        self.pool_used = Gauge("pool_used_bytes", "Device weight-pool bytes in use.", ["device"],
                               namespace=ns, registry=r)
        self.pool_size = Gauge("pool_size_bytes", "Device weight-pool bytes reserved.", ["device"],
                               namespace=ns, registry=r)
        self.host_store_used = Gauge("host_store_used_bytes", "Pinned host-store bytes holding models.",
                                     namespace=ns, registry=r)
        self.host_store_capacity = Gauge("host_store_capacity_bytes", "Pinned host-store capacity.",
                                         namespace=ns, registry=r)
        self.queued = Gauge("queued_requests", "Requests waiting for a device right now.", namespace=ns, registry=r)
        self.loop_lag = Histogram("event_loop_lag_seconds", "How late the gateway/controller event loop ran a timer "
                                  "due every 10 ms: time it spent unable to serve anything (CPU work, collection "
                                  "pauses).", namespace=ns, registry=r, buckets=buckets)
        # Handler sandboxes (functions with a handler only).
        self.sandbox_starts = Counter("sandbox_starts", "Sandbox process starts by function and outcome "
                                      "(started, start_failed).", ["function", "outcome"], namespace=ns, registry=r)
        self.sandbox_start_seconds = Histogram("sandbox_start_seconds", "Cold start of a sandbox: fork, isolation, "
                                               "import and setup(), by function.", ["function"], namespace=ns,
                                               registry=r, buckets=buckets)
        self.sandbox_exits = Counter("sandbox_exits", "Sandboxes gone, by function and kind: replaced (crash, "
                                     "timeout, memory limit) or stopped (idle, unload).", ["function", "kind"],
                                     namespace=ns, registry=r)
        self.handler_seconds = Histogram("handler_duration_seconds", "A handler's run in its sandbox (model calls "
                                         "included), by function.", ["function"], namespace=ns, registry=r,
                                         buckets=buckets)

    # -- gateway ----------------------------------------------------------------------------------------------

    def observe_http(self, route: str, method: str, code: int, seconds: float) -> None:
        self._child(self.http_requests, route, method, str(code)).inc()
        self._child(self.http_seconds, route).observe(seconds)

    def observe_request(self, function: str, code: int, seconds: float) -> None:
        """One infer request of an existing function, whatever its outcome (errors included)."""
        self._child(self.requests, function, str(code)).inc()
        self._child(self.request_seconds, function).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: prometheus_client validates and locks on every call, and
        the request path records about ten series per request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_status(self, status: NodeStatus) -> None:
        """Set every gauge from a node snapshot (the gateway calls this before each scrape, so gauges are
        current without the node pushing them)."""
        for d in status.devices:
            self.set_pool(d.device, d.pool_used_bytes, d.pool_bytes)
        self.set_host_store(status.host_store_bytes, status.host_store_capacity)
        self.set_queued(status.queued)

    # -- node -------------------------------------------------------------------------------------------------

    def observe_node_request(self, function: str, seconds: float) -> None:
        """One request completed by the node, from admission to result."""
        self._child(self.node_request_seconds, function).observe(seconds)

    def observe_queue(self, function: str, seconds: float) -> None:
        self._child(self.queue_seconds, function).observe(seconds)

    def observe_compute(self, device: str, seconds: float) -> None:
        self._child(self.compute_seconds, device).observe(seconds)

    def observe_swap(self, device: str, seconds: float, nbytes: int) -> None:
        """One swap-in that copied ``nbytes`` of weights (only the missing pages of a partly resident model)."""
        self._child(self.swap_seconds, device).observe(seconds)
        self._child(self.swap_bytes, device).inc(nbytes)

    def count_eviction(self, device: str, n: int = 1) -> None:
        self._child(self.evictions, device).inc(n)

    def count_slo_miss(self, function: str, n: int = 1) -> None:
        self._child(self.slo_misses, function).inc(n)

    def set_pool(self, device: str, used_bytes: int, total_bytes: int) -> None:
        self._child(self.pool_used, device).set(used_bytes)
        self._child(self.pool_size, device).set(total_bytes)

    def set_host_store(self, used_bytes: int, capacity_bytes: int) -> None:
        self.host_store_used.set(used_bytes)
        self.host_store_capacity.set(capacity_bytes)

    def set_queued(self, n: int) -> None:
        self.queued.set(n)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def observe_sandbox(self, event: SandboxEvent) -> None:
        """One event of a function's sandbox pool (``swapserve.sandbox``'s ``on_event``)."""
        if event.kind in ("started", "start_failed"):
            self._child(self.sandbox_starts, event.function, event.kind).inc()
            if event.kind == "started":
                self._child(self.sandbox_start_seconds, event.function).observe(event.seconds)
        elif event.kind == "request":
            self._child(self.handler_seconds, event.function).observe(event.seconds)
        else:
            self._child(self.sandbox_exits, event.function, event.kind).inc()

    def forget_function(self, function: str) -> None:
        """Drop a deleted function's series, so thousands of short-lived functions don't accumulate."""
        # ``remove`` ignores label sets never observed. (``remove_by_labels`` would do this in one call, but only
        # recent prometheus_client releases have it; pyproject allows >= 0.17.)
        single = (self.request_seconds, self.node_request_seconds, self.queue_seconds, self.slo_misses,
                  self.sandbox_start_seconds, self.handler_seconds)
        for metric in single:
            metric.remove(function)
        for metric, second in ((self.requests, "code"), (self.sandbox_starts, "outcome"), (self.sandbox_exits, "kind")):
            for value in _label_values(metric, "function", function, second):
                metric.remove(function, value)
        by_function = {id(m) for m in (*single, self.requests, self.sandbox_starts, self.sandbox_exits)}
        self._children = {k: v for k, v in self._children.items()
                          if not (k[0] in by_function and k[1][:1] == (function,))}

    # -- exposition -------------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """Prometheus text format of every collector; serve with :attr:`content_type`."""
        return generate_latest(self.registry)


def _label_values(metric: Counter, key: str, value: str, wanted: str) -> list[str]:
    """Values of label ``wanted`` among the series of ``metric`` whose label ``key`` is ``value``."""
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get(key) == value and wanted in sample.labels:
                found.add(sample.labels[wanted])
    return sorted(found)


__all__ = ["LATENCY_BUCKETS", "Metrics"]
