"""Open Inference Protocol v2 against the real node: health, metadata, infer (JSON and binary), repository
index/load/unload, concurrent requests and batching, metrics and the OpenAPI document."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from .harness import Functions, Server, assert_serves, concurrently, deploy, infer_json, metric, outputs_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oip-archives")


@pytest.fixture(scope="module")
def heavy(server: Server, functions: Functions, archives: Path) -> str:
    info = deploy(server, functions.heavy.archive(archives))
    assert info["state"] == "READY", info
    return "heavy"


# -- health and metadata -------------------------------------------------------------------------------------


def test_health_and_server_metadata(server: Server):
    r = server.request("GET", "/v2/health/live")
    assert (r.status, r.json()) == (200, {"live": True})
    r = server.request("GET", "/v2/health/ready")
    assert (r.status, r.json()) == (200, {"ready": True})
    r = server.request("GET", "/v2")
    assert r.status == 200
    doc = r.json()
    assert doc["name"] == "swapserve" and isinstance(doc["version"], str) and doc["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(doc["extensions"])


def test_model_metadata_and_readiness(server: Server):
    r = server.request("GET", "/v2/models/pair")
    assert r.status == 200, r.body
    doc = r.json()
    assert doc["name"] == "pair" and doc["versions"] == ["1"] and doc["platform"]
    assert doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]},
                             {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]
    assert doc["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "z", "datatype": "FP32", "shape": [-1, 1]}]
    assert server.request("GET", "/v2/models/pair/versions/1").json() == doc
    server.request("GET", "/v2/models/pair/versions/7").error(404)
    r = server.request("GET", "/v2/models/mlp/ready")
    assert (r.status, r.json()) == (200, {"name": "mlp", "ready": True})
    assert server.request("GET", "/v2/models/mlp/versions/1/ready").status == 200
    server.request("GET", "/v2/models/mlp/versions/2/ready").error(404)


def test_infer_at_a_version(server: Server, functions: Functions):
    x = torch.randn(1, 16)
    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.flatten().tolist()}]}
    r = server.post_json("/v2/models/mlp/versions/1/infer", doc)
    assert r.status == 200, r.body
    torch.testing.assert_close(outputs_of(r.json())["y"], functions.mlp.expected(x)[0])
    assert "version" in server.post_json("/v2/models/mlp/versions/2/infer", doc).error(404)


def test_request_id_header_is_echoed(server: Server):
    doc = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
    r = server.request("POST", "/v2/models/mlp/infer", json.dumps(doc).encode(), {"X-Request-ID": "trace-42"})
    assert r.status == 200 and r.headers.get("x-request-id") == "trace-42"
    r = server.request("POST", "/v2/models/mlp/infer", b"{", {"X-Request-ID": "trace-43"})
    r.error(400)
    assert r.headers.get("x-request-id") == "trace-43", "errors carry the request id too"


# -- inference -----------------------------------------------------------------------------------------------


def test_infer_json_matches_the_model(server: Server, functions: Functions):
    x = torch.randn(3, 16)
    r = infer_json(server, "mlp", {"x": x}, id="req-json-1")
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["model_name"] == "mlp" and doc["model_version"] == "1" and doc["id"] == "req-json-1"
    assert r.headers.get("x-request-id") == "req-json-1"
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [3, 4])
    torch.testing.assert_close(outputs_of(doc)["y"], functions.mlp.expected(x)[0])


def test_a_resident_model_runs_in_the_side_lane(server: Server, functions: Functions):
    """With the device otherwise idle, a model already on it goes to the second lane (keeping the first, the
    only one that swaps, free); the answer is the same."""
    x = torch.randn(1, 16)
    first = infer_json(server, "mlp", {"x": x})
    assert first.status == 200, first.body
    again = infer_json(server, "mlp", {"x": x})
    params = again.json()["parameters"]
    assert (params["lane"], params["swapped"]) == (1, False), params
    assert outputs_of(again.json())["y"].tolist() == outputs_of(first.json())["y"].tolist()
    phases = params["phases_ms"]  # where the worker's run went, each part timed once
    top = {"wait", "upload", "place", "device", "output"}
    assert set(phases) == top | {"place_lock", "place_remap", "place_remap_cpu"}, phases  # parts of "place"
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases[k] for k in top) <= params["compute_ms"] + 1e-3, phases
    assert phases["place_lock"] + phases["place_remap"] <= phases["place"] + 1e-3, phases
    assert phases["place_remap_cpu"] <= phases["place_remap"] + 0.1, phases  # CPU time (coarser clock) in wall time
    # The node's time in parts, each timed on its own: the messages' ways each way are on the clock the worker
    # and the controller share, so they are neither negative nor more than what is left of the node's time.
    parts = ("queue_ms", "dispatch_ms", "to_worker_ms", "worker_ms", "from_worker_ms")
    assert all(params[k] >= 0 for k in parts), params
    assert sum(params[k] for k in parts) <= params["total_ms"] + 1e-3, params
    assert 0 < params["decide_ms"] <= params["dispatch_ms"], params  # the decision, a part of the dispatch
    assert params["expected_ms"] > 0, params  # the scheduler's estimate of the run, to compare with compute_ms
    assert params["copy_ms"] == 0.0, params  # resident: nothing to copy
    first_params = first.json()["parameters"]  # swapped, unless an earlier test left the model on the device
    assert (0 < first_params["copy_ms"] < first_params["expected_ms"]) == first_params["swapped"], first_params


def test_token_ids_past_the_table_are_a_400_and_the_function_goes_on(server: Server, functions: Functions):
    """The pair model looks its ids up in a 10-row embedding: an id of 10 would index past it (on a GPU, a
    device-side assert that ends the worker's CUDA context for every model there)."""
    x = torch.randn(1, 8)
    r = infer_json(server, "pair", {"x": x, "ids": torch.tensor([[1, 10, 2]])})
    assert r.status == 400 and "[0, 10)" in r.error(400), r.body
    ok = infer_json(server, "pair", {"x": x, "ids": torch.tensor([[1, 9, 2]])})
    assert ok.status == 200, ok.body


def test_infer_json_nested_data_and_two_inputs(server: Server, functions: Functions):
    x, ids = torch.randn(2, 8), torch.randint(0, 10, (2, 3))
    doc = {"inputs": [{"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": ids.tolist()},  # nested
                      {"name": "x", "shape": [2, 8], "datatype": "FP32", "data": x.tolist()}]}
    r = server.post_json("/v2/models/pair/infer", doc)
    assert r.status == 200, r.body
    got = outputs_of(r.json())
    assert list(got) == ["y", "z"], "every declared output, in declared order"
    want_y, want_z = functions.pair.expected(x, ids)
    torch.testing.assert_close(got["y"], want_y)
    torch.testing.assert_close(got["z"], want_z)


def _binary_request(inputs: dict[str, torch.Tensor], outputs: list[dict[str, Any]] | None) -> tuple[bytes, int]:
    entries, blobs = [], []
    for name, t in inputs.items():
        raw = t.contiguous().numpy().tobytes()
        entries.append({"name": name, "shape": list(t.shape), "datatype": {torch.float32: "FP32",
                                                                          torch.int64: "INT64"}[t.dtype],
                        "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    doc: dict[str, Any] = {"inputs": entries}
    if outputs is not None:
        doc["outputs"] = outputs
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), len(header)


def _split_binary_response(body: bytes, header_length: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse a binary-extension response by the protocol's text, independently of swapserve's codec."""
    doc = json.loads(body[:header_length])
    offset = header_length
    arrays = {}
    for o in doc["outputs"]:
        dtype = {"FP32": np.float32, "INT64": np.int64}[o["datatype"]]
        if "parameters" in o and "binary_data_size" in o["parameters"]:
            n = o["parameters"]["binary_data_size"]
            arrays[o["name"]] = np.frombuffer(body[offset:offset + n], dtype=dtype).reshape(o["shape"])
            offset += n
        else:
            arrays[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
    assert offset == len(body), "the binary outputs account for every byte after the JSON header"
    return doc, arrays


def test_infer_binary_tensor_extension(server: Server, functions: Functions):
    x, ids = torch.randn(3, 8), torch.randint(0, 10, (3, 3))
    body, n = _binary_request({"x": x, "ids": ids}, [{"name": "y", "parameters": {"binary_data": True}},
                                                     {"name": "z", "parameters": {"binary_data": False}}])
    r = server.request("POST", "/v2/models/pair/infer", body,
                       {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(n)})
    assert r.status == 200, r.body
    header_length = int(r.headers["inference-header-content-length"])
    doc, arrays = _split_binary_response(r.body, header_length)
    assert [o["name"] for o in doc["outputs"]] == ["y", "z"]
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 3 * 4 * 4
    assert "data" in doc["outputs"][1], "z was asked for as JSON"
    want_y, want_z = functions.pair.expected(x, ids)
    torch.testing.assert_close(torch.from_numpy(arrays["y"].copy()), want_y)
    torch.testing.assert_close(torch.from_numpy(arrays["z"].copy()), want_z)


def test_binary_input_json_output_and_output_selection(server: Server, functions: Functions):
    x, ids = torch.randn(1, 8), torch.randint(0, 10, (1, 3))
    body, n = _binary_request({"x": x, "ids": ids}, [{"name": "z"}])
    r = server.request("POST", "/v2/models/pair/infer", body, {"Inference-Header-Content-Length": str(n)})
    assert r.status == 200, r.body
    assert "inference-header-content-length" not in r.headers, "no binary output was asked for"
    doc = r.json()
    assert [o["name"] for o in doc["outputs"]] == ["z"], "only the requested output"
    torch.testing.assert_close(outputs_of(doc)["z"], functions.pair.expected(x, ids)[1])


def test_client_infer_binary_and_json(server: Server, functions: Functions):
    client = server.client()
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    want = functions.mlp.expected(torch.from_numpy(x))[0]
    for binary in (True, False):
        out = client.infer("mlp", {"x": x}, binary=binary)
        assert list(out) == ["y"]
        torch.testing.assert_close(out["y"], want)


# -- model repository ----------------------------------------------------------------------------------------


def test_repository_index(server: Server):
    r = server.post_json("/v2/repository/index", {})
    assert r.status == 200, r.body
    entries = {e["name"]: e for e in r.json()}
    assert entries["mlp"] == {"name": "mlp", "version": "1", "state": "READY", "reason": ""}
    assert entries["pair"]["state"] == "READY"
    assert server.request("POST", "/v2/repository/index").status == 200, "an empty body is allowed"
    server.post_json("/v2/repository/index", {"ready": "yes"}).error(400)


def test_unload_then_load(server: Server, functions: Functions, archives: Path):
    info = deploy(server, functions.mlp.variant(archives, name="toggle"))
    assert info["state"] == "READY"
    assert_serves(server, functions.mlp, seed=1, name="toggle")

    server.post_json("/v2/repository/models/toggle/unload", {"parameters": {"unload_dependents": "yes"}},
                     token=True).error(400)
    assert_serves(server, functions.mlp, seed=1, name="toggle"), "a refused unload changes nothing"
    r = server.post_json("/v2/repository/models/toggle/unload", {}, token=True)
    assert r.status == 200, r.body
    assert r.json()["state"] == "UNAVAILABLE"
    r = server.post_json("/v2/repository/models/toggle/unload", {}, token=True)
    assert (r.status, r.json()["state"]) == (200, "UNAVAILABLE"), "unloading twice is harmless"
    r = server.request("GET", "/v2/models/toggle/ready")
    assert r.status == 400 and r.json()["ready"] is False
    assert "unload" in r.json()["error"]
    infer_json(server, "toggle", {"x": torch.randn(1, 16)}).error(503)
    index = {e["name"]: e for e in server.post_json("/v2/repository/index", {}).json()}
    assert index["toggle"]["state"] == "UNAVAILABLE"
    ready_only = {e["name"] for e in server.post_json("/v2/repository/index", {"ready": True}).json()}
    assert "toggle" not in ready_only and {"mlp", "pair"} <= ready_only
    assert server.request("GET", "/v2/models/toggle").status == 200, "metadata stays available"
    assert_serves(server, functions.mlp, seed=2), "other functions are unaffected"

    r = server.post_json("/v2/repository/models/toggle/load", {}, token=True)
    assert r.status == 200, r.body
    assert r.json()["state"] == "READY"
    assert server.request("GET", "/v2/models/toggle/ready").status == 200
    assert_serves(server, functions.mlp, seed=3, name="toggle")
    r = server.post_json("/v2/repository/models/toggle/load", {}, token=True)
    assert (r.status, r.json()["state"]) == (200, "READY"), "loading a loaded function is harmless"
    assert_serves(server, functions.mlp, seed=4, name="toggle")
    server.post_json("/v2/repository/models/nosuch/load", {}, token=True).error(404)
    server.post_json("/v2/repository/models/nosuch/unload", {}, token=True).error(404)


# -- concurrency ---------------------------------------------------------------------------------------------


def test_concurrent_requests_get_their_own_answers(server: Server, functions: Functions):
    n = 12
    inputs = [torch.randn(1 + i % 3, 16) for i in range(n)]  # batches of 1-3 items
    client = server.client()
    results = concurrently(n, lambda i: client.infer("mlp", {"x": inputs[i]}, binary=i % 2 == 0))
    for i, out in enumerate(results):
        assert isinstance(out, dict), f"request {i} failed: {out!r}"
        torch.testing.assert_close(out["y"], functions.mlp.expected(inputs[i])[0])


def test_large_outputs_come_back_whole_and_each_to_its_request(server: Server, functions: Functions,
                                                                 archives: Path):
    """Outputs over 1 MiB per run are copied out of the worker's slab on a thread: concurrent requests (some
    batched together) each get their own rows, over both the JSON and the binary encodings."""
    assert deploy(server, functions.wide.archive(archives))["state"] == "READY"
    n = 6
    inputs = [torch.randn(1 + i % 2, 16) for i in range(n)]
    client = server.client()
    results = concurrently(n, lambda i: client.infer("wide", {"x": inputs[i]}, binary=i % 3 != 0))
    for i, out in enumerate(results):
        assert isinstance(out, dict), f"request {i} failed: {out!r}"
        want = functions.wide.expected(inputs[i])[0]
        assert out["y"].shape == want.shape and want[0].nbytes > 1 << 20
        torch.testing.assert_close(out["y"], want, rtol=1e-5, atol=1e-3)  # batched runs round differently


def test_concurrent_requests_are_batched(server: Server, functions: Functions, heavy: str):
    """While one slow run is in flight the others queue; they leave in batches (fewer runs than requests),
    each request getting its own rows back."""
    before = server.request("GET", "/metrics").body.decode()
    n = 5
    inputs = [torch.randn(1, 1024) for _ in range(n)]
    client = server.client()
    results = concurrently(n, lambda i: client.infer(heavy, {"x": inputs[i]}))
    for i, out in enumerate(results):
        assert isinstance(out, dict), f"request {i} failed: {out!r}"
        torch.testing.assert_close(out["y"], functions.heavy.expected(inputs[i])[0], rtol=1e-4, atol=1e-5)
    after = server.request("GET", "/metrics").body.decode()
    runs = (metric(after, "swapserve_compute_seconds_count", device="cpu")
            - metric(before, "swapserve_compute_seconds_count", device="cpu"))
    served = (metric(after, "swapserve_requests_total", function=heavy, code="200")
              - metric(before, "swapserve_requests_total", function=heavy, code="200"))
    assert served == n
    assert 1 <= runs < n, f"{n} concurrent requests ran as {runs} runs: no batching"


# -- observability -------------------------------------------------------------------------------------------


def test_metrics_count_requests(server: Server):
    before = server.request("GET", "/metrics").body.decode()
    for _ in range(3):
        assert infer_json(server, "mlp", {"x": torch.randn(1, 16)}).status == 200
    infer_json(server, "mlp", {"x": torch.randn(1, 15)}).error(400)
    time.sleep(0.05)  # the loop-lag probe ticks every 10 ms: let a few pass (the requests may take less)
    r = server.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.body.decode()
    ok = lambda text: metric(text, "swapserve_requests_total", function="mlp", code="200")  # noqa: E731
    bad = lambda text: metric(text, "swapserve_requests_total", function="mlp", code="400")  # noqa: E731
    assert ok(after) - ok(before) == 3
    assert bad(after) - bad(before) == 1
    assert metric(after, "swapserve_request_duration_seconds_count", function="mlp") >= 4
    assert metric(after, "swapserve_pool_size_bytes", device="cpu") > 0
    assert metric(after, "swapserve_http_requests_total", route="/v2/models/{name}/infer", method="POST",
                  code="200") >= 3
    # The event-loop probe ticks all along (every 10 ms) whether or not requests come.
    ticks = "swapserve_event_loop_lag_seconds_count"
    assert metric(after, ticks) > metric(before, ticks)


def test_openapi_and_docs(server: Server):
    r = server.request("GET", "/openapi.json")
    assert r.status == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v2/health/ready", "/v2/models/{name}/infer", "/v2/repository/index", "/api/v1/functions"):
        assert path in doc["paths"], path
    assert "post" in doc["paths"]["/v2/models/{name}/infer"]
    r = server.request("GET", "/docs")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
