"""The gateway over real HTTP on localhost, against a small real in-process node serving torch modules.

Every route, every error status, the token rules, body limits, Retry-After, safe bundle extraction, metrics,
and that the server keeps serving after bad requests.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.test_utils as atu
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from swapserve import __version__
from swapserve.fronts.remote import RemoteNode
from swapserve.fronts.service import FrontService
from swapserve.gateway import GatewayConfig, make_app, oip
from swapserve.gateway.openapi import OPENAPI
from swapserve.metrics import Metrics
from swapserve.node.api import FunctionState
from swapserve.node.runlog import RunRecord
from tiny_node import FastTestServer, TinyNode

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GZIP = {"Content-Type": "application/gzip"}

Scenario = Callable[[atu.TestClient, TinyNode], Awaitable[None]]

MODE = "direct"
"""How ``run`` serves (set per test by the ``mode`` fixture)."""


@pytest.fixture(autouse=True, params=["direct", "fast", "relayed"])
def mode(request: pytest.FixtureRequest) -> Any:
    """Every scenario three times: the aiohttp app over the node in its own process; the same behind the fast
    path (:mod:`swapserve.gateway.fast`), as ``serve`` listens, which answers infer requests itself and hands
    every other connection to the app; and the app over a RemoteNode — the way an HTTP front (``serve --fronts
    K``) reaches the node — through a real Unix socket to a FrontService."""
    global MODE
    MODE = request.param
    yield
    MODE = "direct"


def run(scenario: Scenario, metrics: Metrics | None = None, **config: Any) -> TinyNode:
    """Serve a fresh TinyNode on localhost and play ``scenario`` against it."""

    async def main() -> TinyNode:
        node = TinyNode()
        gateway = GatewayConfig(**({"token": TOKEN} | config))
        if MODE != "relayed":
            app = make_app(node, gateway, metrics)
            server = atu.TestServer(app) if MODE == "direct" else FastTestServer(app, node, gateway)
            async with atu.TestClient(server) as client:
                await scenario(client, node)
            return node
        service = FrontService(node, metrics or Metrics(), "127.0.0.1", 0, 0, gateway)
        await service.listen()
        front = RemoteNode()
        await front.connect(str(service.socket_path), 0, 0)
        # A change made on the node is pushed to the front on the next loop turn; a call's reply, on the same
        # connection, comes after that push.
        node.synced = front.status  # type: ignore[method-assign]
        try:
            async with atu.TestClient(atu.TestServer(make_app(front, gateway, front.metrics))) as client:
                await scenario(client, node)
        finally:
            await service.close()
        return node

    return asyncio.run(main())


async def error(response: Any, status: int) -> str:
    """Assert a JSON error with ``status``; return its message."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return (await response.json())["error"]


async def infer(c: atu.TestClient, name: str, inputs: dict[str, torch.Tensor], path: str | None = None,
                headers: dict[str, str] | None = None, **kw: Any) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    enc = oip.encode_infer_request(inputs, **kw)
    h = dict(headers or {})
    if enc.header_length is not None:
        h[oip.HEADER_LENGTH] = str(enc.header_length)
    r = await c.post(path or f"/v2/models/{name}/infer", data=enc.body, headers=h)
    if r.status != 200:
        return r, {}, {}
    doc, outputs = oip.decode_infer_response(await r.read(), r.headers.get(oip.HEADER_LENGTH))
    return r, doc, outputs


async def good_infer(c: atu.TestClient, node: TinyNode) -> None:
    """The server still serves, and correctly."""
    x = torch.randn(2, 4)
    r, _, out = await infer(c, "linear", {"x": x})
    assert r.status == 200
    assert torch.equal(out["y"], node.linear(x).detach())


# -- OIP ------------------------------------------------------------------------------------------------------


def test_health_and_server_metadata() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        assert (await c.get("/v2/health/live")).status == 200
        assert (await c.get("/v2/health/ready")).status == 200
        node.ready = False
        await node.synced()
        assert "not ready" in await error(await c.get("/v2/health/ready"), 503)
        node.live = False
        await node.synced()
        assert "not live" in await error(await c.get("/v2/health/live"), 503)
        meta = await (await c.get("/v2")).json()
        assert meta["name"] == "swapserve" and meta["version"] == __version__
        assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])

    run(scenario)


def test_model_metadata_and_readiness() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        for path in ("/v2/models/mixed", "/v2/models/mixed/versions/1"):
            r = await c.get(path)
            assert r.status == 200
            assert await r.json() == {
                "name": "mixed", "versions": ["1"], "platform": "pytorch_export",
                "inputs": [{"name": "a", "datatype": "FP16", "shape": [-1, 2]},
                           {"name": "ids", "datatype": "INT64", "shape": [-1, 2]}],
                "outputs": [{"name": "sum", "datatype": "BF16", "shape": [-1, 2]},
                            {"name": "positive", "datatype": "BOOL", "shape": [-1, 2]}]}
        assert "no version '7'" in await error(await c.get("/v2/models/mixed/versions/7"), 404)
        assert "no function 'nope'" in await error(await c.get("/v2/models/nope"), 404)
        assert (await c.get("/v2/models/mixed/ready")).status == 200
        assert (await c.get("/v2/models/mixed/versions/1/ready")).status == 200
        await node.unload("mixed")
        await node.synced()
        assert "UNAVAILABLE: unloaded by request" in await error(await c.get("/v2/models/mixed/ready"), 400)
        await error(await c.get("/v2/models/nope/ready"), 404)
        await error(await c.get("/v2/models/mixed/versions/2/ready"), 404)

    run(scenario)


def test_infer_json_is_a_real_computation() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        x = torch.randn(3, 4)
        r, doc, out = await infer(c, "linear", {"x": x}, request_id="req-1")
        assert r.status == 200 and r.content_type == "application/json"
        assert oip.HEADER_LENGTH not in r.headers
        assert doc["model_name"] == "linear" and doc["model_version"] == "1" and doc["id"] == "req-1"
        assert doc["parameters"]["device"] == "cpu"
        assert torch.equal(out["y"], node.linear(x).detach())  # fp32 survives JSON exactly
        r, doc, out = await infer(c, "linear", {"x": x}, path="/v2/models/linear/versions/1/infer")
        assert r.status == 200 and torch.equal(out["y"], node.linear(x).detach())
        r, _, _ = await infer(c, "linear", {"x": x}, path="/v2/models/linear/versions/2/infer")
        assert "no version '2'" in await error(r, 404)
        assert node.request_ids == ["req-1", None]

    run(scenario)


def test_request_parameters_reach_the_node_and_its_answer_carries_the_handlers() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r, doc, _ = await infer(c, "linear", {"x": torch.randn(1, 4)}, parameters={"top_k": 3, "device": "mine"})
        assert r.status == 200
        assert doc["parameters"]["top_k"] == 3, "a handler's parameters are in the answer"
        assert doc["parameters"]["device"] == "cpu", "the node's own timings are never shadowed"

    run(scenario)


def test_the_node_is_given_the_margin_the_gateway_learned_from_earlier_answers() -> None:
    """Each infer call tells the node the request's time outside its plan: the gateway's own so far (decoding)
    and what the function's answers took after their runs — the node's part (``answer_ms``), then the answer's
    encoding and writing — as learned from the answers before."""
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        x = torch.randn(1, 4)
        node.answer_ms = 100.0
        assert (await infer(c, "linear", {"x": x}))[0].status == 200
        assert 0 < node.margins[0] < 100.0, "nothing learned yet: its own decoding only"
        node.answer_ms = 0.0
        assert (await infer(c, "linear", {"x": x}))[0].status == 200
        assert node.margins[1] > 100.0, "the first answer's time after its run, and this one's decoding"
        assert (await infer(c, "linear", {"x": x}))[0].status == 200
        # A twentieth of the way down: 5 ms, past what the decoding's time may vary on a loaded machine.
        assert node.margins[2] < node.margins[1] - 2.0, "a quicker answer brings it down (slowly)"
        r, _, _ = await infer(c, "nope", {"x": x})
        assert r.status == 404 and len(node.margins) == 3

    run(scenario)


def test_a_function_yet_to_answer_is_given_the_margin_of_answers_shaped_as_its() -> None:
    """Until a function has answered, its margin is what answers of the same declared outputs took, whichever
    function gave them ("busy" declares what "linear" does; "mixed" other outputs)."""
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        node.answer_ms = 40.0
        assert (await infer(c, "linear", {"x": torch.randn(1, 4)}))[0].status == 200
        assert (await infer(c, "busy", {"x": torch.randn(1, 4)}))[0].status == 429
        assert (await infer(c, "mixed", {"a": torch.ones(1, 2, dtype=torch.float16),
                                         "ids": torch.ones(1, 2, dtype=torch.int64)}))[0].status == 200
        assert node.margins[1] > 40.0, "linear's answer taught busy's first margin"
        assert node.margins[2] < 40.0, "nothing learned of mixed's shape yet"

    run(scenario)


def test_json_route_runs_a_handler_on_any_json_value() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r = await c.post("/v1/functions/linear/invoke?lang=en", data=b'[1, "two", {"3": null}]')
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.json() == {"got": [1, "two", {"3": None}], "parameters": {"lang": "en"}}
        r = await c.post("/v1/functions/linear/invoke", data=b"")
        assert (await r.json())["got"] is None, "an empty body is null"
        assert "malformed JSON" in await error(await c.post("/v1/functions/linear/invoke", data=b"{nope"), 400)
        assert "no handler" in await error(await c.post("/v1/functions/mixed/invoke", data=b"{}"), 400)
        assert "no function" in await error(await c.post("/v1/functions/nope/invoke", data=b"{}"), 404)

    run(scenario)


@pytest.mark.parametrize("binary_inputs, binary_outputs", [(True, True), (True, False), (False, True)])
def test_infer_binary_extension(binary_inputs: bool, binary_outputs: bool) -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        a = torch.randn(4, 2).half()
        ids = torch.tensor([[1, -2], [2**40, 0], [7, 7], [-(2**50), 3]])
        r, doc, out = await infer(c, "mixed", {"a": a, "ids": ids}, binary_inputs=binary_inputs,
                                  binary_outputs=binary_outputs)
        assert r.status == 200
        assert (oip.HEADER_LENGTH in r.headers) == binary_outputs
        assert r.content_type == ("application/octet-stream" if binary_outputs else "application/json")
        assert [o["name"] for o in doc["outputs"]] == ["sum", "positive"]
        assert torch.equal(out["sum"], (a.float() + ids.float()).bfloat16())
        assert torch.equal(out["positive"], a > 0)
        # Only the outputs asked for, binary as asked per output.
        r, doc, out = await infer(c, "mixed", {"a": a, "ids": ids}, binary_inputs=binary_inputs,
                                  outputs=["positive"], binary_outputs=binary_outputs)
        assert list(out) == ["positive"] and torch.equal(out["positive"], a > 0)
        assert ("binary_data_size" in doc["outputs"][0].get("parameters", {})) == binary_outputs

    run(scenario)


@pytest.mark.parametrize("binary_outputs", [True, False])
def test_large_outputs_are_streamed_whole_with_their_request_id(binary_outputs: bool) -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        x = torch.tensor([[1.0, 2, 3, 4], [-0.5, 0, 0, 1]])
        r, doc, out = await infer(c, "wide", {"x": x}, binary_outputs=binary_outputs, request_id="wide-1")
        assert r.status == 200 and r.headers["X-Request-ID"] == "wide-1" and doc["id"] == "wide-1"
        assert r.content_length == len(await r.read())
        assert torch.equal(out["big"], torch.arange(786432, dtype=torch.float16).repeat(2, 1) * x[:, :1].half())
        assert torch.equal(out["small"], node.linear(x).detach())
        # Only the small output asked for: an ordinary response.
        r, _, out = await infer(c, "wide", {"x": x}, binary_outputs=binary_outputs, outputs=["small"])
        assert r.status == 200 and list(out) == ["small"]
        await good_infer(c, node)

    run(scenario)


def test_request_ids_are_echoed_when_given() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r = await c.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
        assert r.headers["X-Request-ID"] == "abc-123"
        assert "X-Request-ID" not in (await c.get("/v2/health/live")).headers
        r = await c.get("/v2/models/nope", headers={"X-Request-ID": "err-1"})  # errors too
        assert r.status == 404 and r.headers["X-Request-ID"] == "err-1"
        r, doc, _ = await infer(c, "linear", {"x": torch.ones(1, 4)}, request_id="body-id")
        assert r.headers["X-Request-ID"] == "body-id" and doc["id"] == "body-id"
        r, _, _ = await infer(c, "linear", {"x": torch.ones(1, 4)}, headers={"X-Request-ID": "hdr-id"})
        assert r.headers["X-Request-ID"] == "hdr-id"
        # An id that would not be a safe header value stays in the body only.
        r, doc, _ = await infer(c, "linear", {"x": torch.ones(1, 4)}, request_id="bad\r\nSet-Cookie: x=1")
        assert r.status == 200 and "X-Request-ID" not in r.headers and "Set-Cookie" not in r.headers
        assert doc["id"] == "bad\r\nSet-Cookie: x=1"
        assert node.request_ids == ["body-id", "hdr-id", "bad\r\nSet-Cookie: x=1"]

    run(scenario)


def test_infer_errors_are_json_with_the_right_status_and_the_server_keeps_serving() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        x = {"x": torch.ones(1, 4)}
        url = "/v2/models/linear/infer"
        assert "malformed JSON" in await error(await c.post(url, data=b"{not json"), 400)
        assert "datatype FP16, but 'linear' declares FP32" in await error(
            (await infer(c, "linear", {"x": torch.ones(1, 4).half()}))[0], 400)
        assert "does not match the declared" in await error((await infer(c, "linear", {"x": torch.ones(1, 5)}))[0], 400)
        assert "exceeds 'linear''s max_batch (8)" in await error(
            (await infer(c, "linear", {"x": torch.ones(9, 4)}))[0], 400)
        assert "body has only" in await error(
            await c.post(url, data=b'{"inputs": []}', headers={oip.HEADER_LENGTH: "1000"}), 400)
        assert "must be a non-negative integer" in await error(
            await c.post(url, data=b'{"inputs": []}', headers={oip.HEADER_LENGTH: "ten"}), 400)
        assert "no function 'nope'" in await error((await infer(c, "nope", x))[0], 404)
        await node.unload("mixed")
        r, _, _ = await infer(c, "mixed", {"a": torch.ones(1, 2).half(), "ids": torch.ones(1, 2, dtype=torch.int64)})
        assert "UNAVAILABLE" in await error(r, 503)
        r, _, _ = await infer(c, "busy", x)
        assert "queue full" in await error(r, 429)
        assert r.headers["Retry-After"] == "3"  # 2.2 s, rounded up to whole seconds
        r, _, _ = await infer(c, "late", x)
        assert "cannot meet the SLO" in await error(r, 503)
        assert r.headers["Retry-After"] == "1"
        r, _, _ = await infer(c, "broken", x)
        message = await error(r, 500)
        assert "internal server error" in message and "secret" not in message
        await good_infer(c, node)

    run(scenario)


def test_body_limit_is_413_for_infer_with_or_without_content_length() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        big = oip.encode_infer_request({"x": torch.randn(8, 4)}).body
        assert len(big) > 256
        assert "limit of 256 bytes" in await error(await c.post("/v2/models/linear/infer", data=big), 413)

        async def chunks() -> Any:  # chunked transfer: no Content-Length to refuse on, the count must stop it
            for i in range(0, len(big), 64):
                yield big[i:i + 64]

        await error(await c.post("/v2/models/linear/infer", data=chunks()), 413)
        await good_infer(c, node)

    run(scenario, max_body_bytes=256)


def test_request_timeout_is_504_and_cancels_the_node_call() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r, _, _ = await infer(c, "hang", {"x": torch.ones(1, 4)})
        assert "timed out after 0.2 s" in await error(r, 504)
        assert node.cancelled == ["hang"]
        await good_infer(c, node)

    run(scenario, request_timeout_s=0.2)


def test_unknown_routes_and_methods_are_json() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        assert "no route GET /nope" in await error(await c.get("/nope"), 404)
        r = await c.post("/v2/health/live")
        assert "not allowed" in await error(r, 405)
        assert "GET" in r.headers["Allow"]
        await error(await c.get("/v2/models/linear/infer"), 405)
        await error(await c.put("/api/v1/functions", headers=AUTH), 405)
        await good_infer(c, node)

    run(scenario)


def test_repository_index_load_unload() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        index = await (await c.post("/v2/repository/index")).json()
        assert {"name": "linear", "version": "1", "state": "READY", "reason": ""} in index
        assert len(index) == len(node.functions)
        r = await c.post("/v2/repository/models/mixed/unload", headers=AUTH)
        assert r.status == 200 and (await r.json())["state"] == "UNAVAILABLE"
        ready = await (await c.post("/v2/repository/index", json={"ready": True})).json()
        assert "mixed" not in {e["name"] for e in ready} and len(ready) == len(node.functions) - 1
        everything = await (await c.post("/v2/repository/index", json={})).json()
        assert {"name": "mixed", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded by request"} in everything
        await error(await c.get("/v2/models/mixed/ready"), 400)
        r = await c.post("/v2/repository/models/mixed/load", headers=AUTH)
        assert r.status == 200 and (await r.json())["state"] == "READY"
        assert (await c.get("/v2/models/mixed/ready")).status == 200
        await error(await c.post("/v2/repository/models/nope/load", headers=AUTH), 404)
        assert "not supported" in await error(await c.post(
            "/v2/repository/models/mixed/load", headers=AUTH, json={"parameters": {"config": "{}"}}), 400)
        # Triton's clients send unload_dependents with every unload: a function has no other dependents.
        for dependents in (False, True):
            r = await c.post("/v2/repository/models/mixed/unload", headers=AUTH,
                             json={"parameters": {"unload_dependents": dependents}})
            assert r.status == 200, await r.text()
            assert (await c.post("/v2/repository/models/mixed/load", headers=AUTH)).status == 200
        assert "must be true or false" in await error(await c.post(
            "/v2/repository/models/mixed/unload", headers=AUTH, json={"parameters": {"unload_dependents": "no"}}), 400)
        assert "['unload_dependents'] are not supported" in await error(await c.post(
            "/v2/repository/models/mixed/load", headers=AUTH, json={"parameters": {"unload_dependents": False}}), 400)
        assert "must be a JSON object" in await error(await c.post(
            "/v2/repository/models/mixed/unload", headers=AUTH, json={"parameters": [1]}), 400)
        assert "malformed JSON" in await error(await c.post("/v2/repository/index", data=b"{"), 400)
        assert "must be a JSON object" in await error(await c.post("/v2/repository/index", json=[1]), 400)
        assert "ready: must be true or false" in await error(await c.post("/v2/repository/index",
                                                                          json={"ready": "yes"}), 400)

    run(scenario)


GUARDED = [("GET", "/api/v1/functions"), ("POST", "/api/v1/functions"), ("GET", "/api/v1/functions/linear"),
           ("DELETE", "/api/v1/functions/linear"), ("GET", "/api/v1/status"), ("GET", "/api/v1/runs"),
           ("POST", "/v2/repository/models/linear/load"), ("POST", "/v2/repository/models/linear/unload")]


def test_token_rules_on_every_guarded_route() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        for method, path in GUARDED:
            r = await c.request(method, path)
            assert "missing management token" in await error(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "malformed Authorization" in await error(
                await c.request(method, path, headers={"Authorization": f"Basic {TOKEN}"}), 401)
            assert "wrong management token" in await error(
                await c.request(method, path, headers={"Authorization": "Bearer not-it"}), 403)
        assert set(node.functions) >= {"linear"}  # nothing happened
        assert node.functions["linear"][0].state is FunctionState.READY

    run(scenario)


def test_management_disabled_without_a_token_while_serving_goes_on() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        for method, path in GUARDED:
            message = await error(await c.request(method, path, headers=AUTH), 403)
            assert message == "management API disabled: no token configured"
        await good_infer(c, node)

    run(scenario, token=None)


def test_management_list_describe_delete_status() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        listed = (await (await c.get("/api/v1/functions", headers=AUTH)).json())["functions"]
        assert {f["name"] for f in listed} == set(node.functions)
        one = await (await c.get("/api/v1/functions/linear", headers=AUTH)).json()
        assert one["version"] == 1 and one["state"] == "READY" and one["nbytes"] == 64
        assert one["spec"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        await error(await c.get("/api/v1/functions/nope", headers=AUTH), 404)
        status = await (await c.get("/api/v1/status", headers=AUTH)).json()
        assert status["ready"] is True and status["queued"] == 2
        assert status["devices"][0]["resident"] == ["linear"]
        r = await c.delete("/api/v1/functions/linear", headers=AUTH)
        assert r.status == 200 and await r.json() == {"deleted": "linear"}
        await error(await c.delete("/api/v1/functions/linear", headers=AUTH), 404)
        await error((await infer(c, "linear", {"x": torch.ones(1, 4)}))[0], 404)

    run(scenario)


def test_management_lists_what_the_lanes_ran_since_a_time_of_the_node_s_clock() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        node.clock = 7.5
        for begun, ended, kind in ((1.0, 2.0, "piece"), (2.0, 5.0, "run")):
            node.run_log.add(RunRecord(begun, ended, "cpu", 0, "linear", kind, kind == "run", "partial", True,
                                       1 << 20, 1.5, 1.4))
        everything = await (await c.get("/api/v1/runs", headers=AUTH)).json()
        assert everything["now"] == 7.5 and everything["fields"][:6] == ["begun", "ended", "device", "lane",
                                                                         "function", "kind"]
        assert [r[5] for r in everything["runs"]] == ["piece", "run"]
        later = await (await c.get("/api/v1/runs?since=3", headers=AUTH)).json()
        assert [r[5] for r in later["runs"]] == ["run"]
        last = await (await c.get("/api/v1/runs?limit=1", headers=AUTH)).json()
        assert [r[5] for r in last["runs"]] == ["run"]
        for bad in ("soon", "nan", "inf"):
            assert "since must be" in await error(await c.get(f"/api/v1/runs?since={bad}", headers=AUTH), 400)
        for bad in ("0", "65537", "2.5", "all"):
            assert "limit must be" in await error(await c.get(f"/api/v1/runs?limit={bad}", headers=AUTH), 400)

    run(scenario)


# -- deploy bundles -------------------------------------------------------------------------------------------


def tar_gz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
          link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if data is not None:
        info.size = len(data)
    return info, data


SPEC_YAML = """name: {name}
model: {{artifact: artifact}}
slo_ms: 100
max_batch: 4
inputs: [{{name: x, datatype: FP32, shape: [-1, 2]}}]
outputs: [{{name: y, datatype: FP32, shape: [-1, 3]}}]
"""
WEIGHT, BIAS = torch.randn(3, 2), torch.randn(3)
WEIGHTS = torch.cat([WEIGHT.reshape(-1), BIAS]).numpy().tobytes()


def bundle(name: str = "tiny", prefix: str = "", *extra: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    return tar_gz(entry(prefix + "function.yaml", SPEC_YAML.format(name=name).encode()),
                  entry(prefix + "artifact", kind=tarfile.DIRTYPE),
                  entry(prefix + "artifact/weights.bin", WEIGHTS), *extra)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("prefix", ["", "./", "tiny/"], ids=["flat", "dot", "top-level-dir"])
def test_deploy_a_bundle_then_serve_it(tmp_path: Path, prefix: str) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()

    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r = await c.post("/api/v1/functions", data=bundle("tiny", prefix), headers=AUTH | GZIP)
        assert r.status == 201, await r.text()
        info = await r.json()
        assert info["name"] == "tiny" and info["version"] == 1 and info["state"] == "READY"
        assert node.deployed == [["artifact/weights.bin", "function.yaml"]]
        x = torch.randn(4, 2)
        r, doc, out = await infer(c, "tiny", {"x": x})
        assert r.status == 200 and torch.equal(out["y"], x @ WEIGHT.T + BIAS)
        r = await c.post("/api/v1/functions", data=bundle("tiny", prefix), headers=AUTH | GZIP)
        assert (await r.json())["version"] == 2
        assert files_under(uploads) == set()  # every temporary file removed

    run(scenario, uploads_dir=uploads)


UNSAFE = {
    "dotdot": entry("../evil", b"x"),
    "dotdot-deep": entry("artifact/../../../evil", b"x"),
    "absolute": entry("/tmp/swapserve-test-evil", b"x"),
    "symlink": entry("artifact/link", kind=tarfile.SYMTYPE, link="../../../../evil"),
    "symlink-then-write": entry("artifact", kind=tarfile.SYMTYPE, link="/tmp"),
    "hardlink": entry("artifact/hard", kind=tarfile.LNKTYPE, link="function.yaml"),
    "device": entry("artifact/dev", kind=tarfile.CHRTYPE),
    "fifo": entry("artifact/fifo", kind=tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_bundles_are_refused_and_nothing_is_written_outside(tmp_path: Path, case: str) -> None:
    uploads = tmp_path / "work" / "uploads"
    uploads.mkdir(parents=True)
    before = files_under(tmp_path)

    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        data = tar_gz(UNSAFE[case], entry("function.yaml", SPEC_YAML.format(name="evil").encode()),
                      entry("artifact/weights.bin", WEIGHTS))
        message = await error(await c.post("/api/v1/functions", data=data, headers=AUTH | GZIP), 400)
        assert any(w in message for w in ("'..' in a path", "absolute", "link", "device", "fifo")), message
        assert node.deployed == [] and "evil" not in node.functions
        await good_infer(c, node)

    run(scenario, uploads_dir=uploads)
    assert files_under(tmp_path) == before
    assert not Path("/tmp/swapserve-test-evil").exists()


def test_bundle_limits_and_malformed_bundles(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()

    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        post = c.post
        url = "/api/v1/functions"
        big = bundle("tiny", "", entry("artifact/padding", bytes(range(256)) * 64 * 20))  # ~330 KB, compressible
        assert "deploy bundle exceeds" in await error(await post(url, data=torch.randn(40_000).numpy().tobytes(),
                                                                 headers=AUTH | GZIP), 413)
        assert "unpacks to more than" in await error(await post(url, data=big, headers=AUTH | GZIP), 413)
        many = tar_gz(*(entry(f"f{i}", b"") for i in range(60)))
        assert "more than 50 entries" in await error(await post(url, data=many, headers=AUTH | GZIP), 413)
        assert "not a valid .tar.gz archive" in await error(await post(url, data=b"plain text", headers=AUTH | GZIP), 400)
        truncated = bundle()[:-40]
        await error(await post(url, data=truncated, headers=AUTH | GZIP), 400)
        assert "empty body" in await error(await post(url, data=b"", headers=AUTH | GZIP), 400)
        assert "Content-Type must be application/gzip" in await error(
            await post(url, data=bundle(), headers=AUTH | {"Content-Type": "application/zip"}), 415)
        assert "no function.yaml" in await error(
            await post(url, data=tar_gz(entry("a/b.txt", b"x"), entry("c.txt", b"y")), headers=AUTH | GZIP), 400)
        assert "appears twice" in await error(await post(
            url, data=bundle("tiny", "", entry("function.yaml", b"again")), headers=AUTH | GZIP), 400)
        assert "in flight" in await error(await post(url, data=bundle("conflict"), headers=AUTH | GZIP), 409)
        bad_spec = tar_gz(entry("function.yaml", b"name: Bad Name\nslo_ms: -1\n"))
        assert "invalid function.yaml" in await error(await post(url, data=bad_spec, headers=AUTH | GZIP), 400)
        assert files_under(uploads) == set()
        await good_infer(c, node)

    run(scenario, uploads_dir=uploads, max_upload_bytes=100_000, max_bundle_bytes=300_000, max_bundle_files=50)


def test_deploy_outliving_its_timeout_finishes_and_cleans_up(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()

    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        r = await c.post("/api/v1/functions", data=bundle("slow"), headers=AUTH | GZIP)
        assert "deploy goes on in the background" in await error(r, 504)
        assert files_under(uploads) != set()  # still in use by the running deploy
        node.release.set()
        await node.deploy_done.wait()
        for _ in range(3):  # let the task's done-callback run
            await asyncio.sleep(0)
        assert files_under(uploads) == set()
        assert node.functions["slow"][0].state is FunctionState.READY

    run(scenario, uploads_dir=uploads, deploy_timeout_s=0.2)


# -- observability --------------------------------------------------------------------------------------------


def test_metrics_count_and_time_every_request() -> None:
    metrics = Metrics()

    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        metrics.add_collector(lambda m: m.observe_status(node.snapshot()))  # as swapserve's Node does
        await good_infer(c, node)
        await good_infer(c, node)
        await infer(c, "busy", {"x": torch.ones(1, 4)})
        await c.post("/v2/models/linear/infer", data=b"{")
        await infer(c, "no-such-function", {"x": torch.ones(1, 4)})
        await c.get("/nope")
        r = await c.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"] == metrics.content_type
        text = await r.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, tuple(sorted(labels.items()))))

        assert value("swapserve_requests_total", function="linear", code="200") == 2
        assert value("swapserve_requests_total", function="linear", code="400") == 1
        assert value("swapserve_requests_total", function="busy", code="429") == 1
        assert value("swapserve_request_duration_seconds_count", function="linear") == 3
        assert "no-such-function" not in text  # unknown names never become labels
        assert value("swapserve_http_requests_total", route="/v2/models/{name}/infer", method="POST", code="404") == 1
        assert value("swapserve_http_requests_total", route="unmatched", method="GET", code="404") == 1
        assert value("swapserve_pool_used_bytes", device="cpu") == 1 << 20  # gauges from the node's collector
        assert value("swapserve_queued_requests") == 2
        r = await c.get("/metrics", params=[("name[]", "swapserve_queued_requests"),
                                            ("name[]", "swapserve_requests_total")])
        assert {f.name for f in text_string_to_metric_families(await r.text())} == {"swapserve_queued_requests",
                                                                                  "swapserve_requests"}

    run(scenario, metrics=metrics)


def test_openapi_documents_exactly_the_routes_and_docs_render_it() -> None:
    async def scenario(c: atu.TestClient, node: TinyNode) -> None:
        routes = {(r.method.lower(), r.resource.canonical) for r in c.app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
        documented = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops}
        assert routes == documented

        def refs(node: Any) -> list[str]:
            if isinstance(node, dict):
                return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
            return [r for v in node for r in refs(v)] if isinstance(node, list) else []

        for ref in refs(OPENAPI):  # every reference resolves
            target: Any = OPENAPI
            for part in ref.removeprefix("#/").split("/"):
                target = target[part]
        doc = await (await c.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.1") and doc["paths"].keys() == OPENAPI["paths"].keys()
        assert doc["paths"]["/api/v1/functions"]["post"]["security"] == [{"managementToken": []}]
        r = await c.get("/docs")
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        for _, path in documented:
            assert path in page
        assert "<script" not in page and "http://" not in page and "https://" not in page  # fetches nothing

    run(scenario)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="token"):
        GatewayConfig(token="")
    with pytest.raises(ValueError, match="max_body_bytes"):
        GatewayConfig(max_body_bytes=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        GatewayConfig(request_timeout_s=0)
    c = GatewayConfig(max_body_bytes=100)
    assert c.upload_limit == 100 and c.bundle_limit == 400
