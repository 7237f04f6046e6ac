"""Metrics: private registries, every collector the node calls, and the text exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from swapserve.metrics import LATENCY_BUCKETS, Metrics
from swapserve.node.api import DeviceStatus, NodeStatus
from swapserve.sandbox.types import SandboxEvent


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a second node in the same process: no duplicate-timeseries error
    a.observe_request("f", 200, 0.01)
    assert a.registry.get_sample_value("swapserve_requests_total", {"function": "f", "code": "200"}) == 1
    assert b.registry.get_sample_value("swapserve_requests_total", {"function": "f", "code": "200"}) is None


def test_buckets_cover_a_tenth_of_a_millisecond_to_ten_seconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.0001 and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    m = Metrics()
    m.observe_queue("f", 0.00005)
    m.observe_queue("f", 0.003)
    m.observe_queue("f", 30.0)
    get = m.registry.get_sample_value
    assert get("swapserve_queue_seconds_bucket", {"function": "f", "le": "0.0001"}) == 1
    assert get("swapserve_queue_seconds_bucket", {"function": "f", "le": "0.005"}) == 2
    assert get("swapserve_queue_seconds_bucket", {"function": "f", "le": "10.0"}) == 2
    assert get("swapserve_queue_seconds_bucket", {"function": "f", "le": "+Inf"}) == 3
    assert get("swapserve_queue_seconds_count", {"function": "f"}) == 3


def test_node_and_gateway_methods_record_in_base_units() -> None:
    m = Metrics()
    get = m.registry.get_sample_value
    m.observe_request("f", 200, 0.002)
    m.observe_request("f", 200, 0.004)
    m.observe_request("f", 429, 0.0001)
    m.observe_http("/v2/models/{name}/infer", "POST", 200, 0.002)
    m.observe_compute("cuda:0", 0.0037)
    m.observe_swap("cuda:0", 0.0019, 102_000_000)
    m.observe_swap("cuda:0", 0.0021, 50_000_000)
    m.count_eviction("cuda:0")
    m.count_eviction("cuda:0", 2)
    m.count_slo_miss("f")
    m.set_pool("cuda:0", 3 << 30, 8 << 30)
    m.set_host_store(10 << 30, 16 << 30)
    m.set_queued(5)
    assert get("swapserve_requests_total", {"function": "f", "code": "200"}) == 2
    assert get("swapserve_requests_total", {"function": "f", "code": "429"}) == 1
    assert abs(get("swapserve_request_duration_seconds_sum", {"function": "f"}) - 0.0061) < 1e-12
    assert get("swapserve_http_requests_total", {"route": "/v2/models/{name}/infer", "method": "POST",
                                                 "code": "200"}) == 1
    assert get("swapserve_http_request_duration_seconds_count", {"route": "/v2/models/{name}/infer"}) == 1
    assert get("swapserve_compute_seconds_count", {"device": "cuda:0"}) == 1
    assert get("swapserve_swap_seconds_count", {"device": "cuda:0"}) == 2
    assert get("swapserve_swap_bytes_total", {"device": "cuda:0"}) == 152_000_000
    assert get("swapserve_evictions_total", {"device": "cuda:0"}) == 3
    assert get("swapserve_slo_misses_total", {"function": "f"}) == 1
    assert get("swapserve_pool_used_bytes", {"device": "cuda:0"}) == 3 << 30
    assert get("swapserve_pool_size_bytes", {"device": "cuda:0"}) == 8 << 30
    assert get("swapserve_host_store_used_bytes") == 10 << 30
    assert get("swapserve_host_store_capacity_bytes") == 16 << 30
    assert get("swapserve_queued_requests") == 5


def test_observe_status_sets_every_gauge() -> None:
    m = Metrics()
    status = NodeStatus(ready=True, functions=3, host_store_bytes=100, host_store_capacity=1000, queued=7,
                        devices=(DeviceStatus("cuda:0", "H200", 800, 200, ("a",)),
                                 DeviceStatus("cuda:1", "H200", 800, 0, (), serving=False)))
    m.observe_status(status)
    get = m.registry.get_sample_value
    assert get("swapserve_pool_used_bytes", {"device": "cuda:0"}) == 200
    assert get("swapserve_pool_size_bytes", {"device": "cuda:1"}) == 800
    assert get("swapserve_device_serving", {"device": "cuda:0"}) == 1
    assert get("swapserve_device_serving", {"device": "cuda:1"}) == 0
    assert get("swapserve_host_store_used_bytes") == 100 and get("swapserve_queued_requests") == 7


def test_sandbox_events_are_counted_and_timed_by_function() -> None:
    m = Metrics()
    for e in (SandboxEvent("h", "started", 0.02), SandboxEvent("h", "started", 0.03), SandboxEvent("h", "start_failed"),
              SandboxEvent("h", "request", 0.004), SandboxEvent("h", "replaced", reason="timeout"),
              SandboxEvent("h", "stopped", reason="idle")):
        m.observe_sandbox(e)
    get = m.registry.get_sample_value
    assert get("swapserve_sandbox_starts_total", {"function": "h", "outcome": "started"}) == 2
    assert get("swapserve_sandbox_starts_total", {"function": "h", "outcome": "start_failed"}) == 1
    assert get("swapserve_sandbox_start_seconds_count", {"function": "h"}) == 2
    assert abs(get("swapserve_sandbox_start_seconds_sum", {"function": "h"}) - 0.05) < 1e-9
    assert get("swapserve_handler_duration_seconds_count", {"function": "h"}) == 1
    assert get("swapserve_sandbox_exits_total", {"function": "h", "kind": "replaced"}) == 1
    assert get("swapserve_sandbox_exits_total", {"function": "h", "kind": "stopped"}) == 1


def test_forget_function_drops_its_series_only() -> None:
    m = Metrics()
    for fn in ("gone", "kept"):
        m.observe_request(fn, 200, 0.01)
        m.observe_request(fn, 503, 0.01)
        m.observe_queue(fn, 0.001)
        m.observe_node_request(fn, 0.002)
        m.count_slo_miss(fn)
        m.observe_sandbox(SandboxEvent(fn, "started", 0.02))
        m.observe_sandbox(SandboxEvent(fn, "request", 0.004))
        m.observe_sandbox(SandboxEvent(fn, "replaced", reason="crash"))
    m.forget_function("gone")
    m.forget_function("never-seen")  # harmless
    assert 'function="gone"' not in m.render().decode()
    get = m.registry.get_sample_value
    assert get("swapserve_requests_total", {"function": "kept", "code": "503"}) == 1
    assert get("swapserve_queue_seconds_count", {"function": "kept"}) == 1
    assert get("swapserve_node_request_duration_seconds_count", {"function": "kept"}) == 1
    assert get("swapserve_slo_misses_total", {"function": "kept"}) == 1
    assert get("swapserve_sandbox_starts_total", {"function": "kept", "outcome": "started"}) == 1
    assert get("swapserve_handler_duration_seconds_count", {"function": "kept"}) == 1
    assert get("swapserve_sandbox_exits_total", {"function": "kept", "kind": "replaced"}) == 1
    m.observe_sandbox(SandboxEvent("gone", "started", 0.02))  # a forgotten function's series come back only if
    assert get("swapserve_sandbox_starts_total", {"function": "gone", "outcome": "started"}) == 1  # observed anew


def test_render_is_parseable_prometheus_text() -> None:
    m = Metrics()
    m.observe_request("f", 200, 0.01)
    m.observe_swap("cpu", 0.5, 1 << 20)
    text = m.render()
    assert isinstance(text, bytes)
    assert m.content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert families["swapserve_request_duration_seconds"].type == "histogram"
    assert families["swapserve_requests"].type == "counter"
    assert families["swapserve_pool_used_bytes"].type == "gauge"
    names = {"swapserve_queue_seconds", "swapserve_swap_seconds", "swapserve_swap_bytes", "swapserve_evictions",
             "swapserve_slo_misses", "swapserve_host_store_used_bytes", "swapserve_host_store_capacity_bytes",
             "swapserve_queued_requests", "swapserve_compute_seconds", "swapserve_pool_size_bytes",
             "swapserve_http_requests", "swapserve_http_request_duration_seconds",
             "swapserve_node_request_duration_seconds"}
    assert names <= set(families)
