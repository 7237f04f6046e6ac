"""Changing a function while its requests are in flight or queued (unload, delete): every request gets a clean
answer — its result, or a clear 503 — never a 500 and never a hang."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from .harness import Functions, Response, Server, assert_serves, infer_json, outputs_of

pytestmark = pytest.mark.integration


def _start_requests(server: Server, name: str, inputs: list[torch.Tensor]) -> tuple[list[threading.Thread], list[Any]]:
    results: list[Any] = [None] * len(inputs)

    def call(i: int) -> None:
        try:
            results[i] = infer_json(server, name, {"x": inputs[i]})
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    return threads, results


def _wait_in_flight(server: Server, name: str, queued: int) -> None:
    """Until a run is in flight on the device and ``queued`` requests wait behind it."""
    deadline = time.monotonic() + 20
    while True:
        st = server.client().status()
        if st["devices"][0]["busy"] and st["queued"] >= queued:
            return
        assert time.monotonic() < deadline, f"requests of {name} never got in flight: {st}"
        time.sleep(0.01)


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"


def _check(results: list[Any], inputs: list[torch.Tensor], functions: Functions, refused: str,
           gone: str | None = None) -> list[int]:
    """Each request served right, or refused (503, ``refused``) — or, given ``gone``, answered 404 with it: a
    request that reached the node only after the function was deleted."""
    codes = []
    for i, r in enumerate(results):
        assert isinstance(r, Response), f"request {i} got no HTTP answer: {r!r}"
        codes.append(r.status)
        if r.status == 200:
            torch.testing.assert_close(outputs_of(r.json())["y"], functions.heavy.expected(inputs[i])[0],
                                       rtol=1e-4, atol=1e-5)
        elif r.status == 404 and gone is not None:
            assert gone in r.error(404), f"request {i}: {r.body[:300]!r}"
        else:
            assert refused in r.error(503), f"request {i}: HTTP {r.status} {r.body[:300]!r}"
    return codes


def test_unload_with_requests_in_flight_and_queued(server: Server, functions: Functions, tmp_path: Path):
    server.client().deploy(functions.heavy.variant(tmp_path, name="unloading", max_batch=1))
    inputs = [torch.randn(1, 1024) for _ in range(4)]
    threads, results = _start_requests(server, "unloading", inputs)
    _wait_in_flight(server, "unloading", queued=1)
    r = server.post_json("/v2/repository/models/unloading/unload", {}, token=True)
    assert r.status == 200, r.body
    _join(threads)
    codes = _check(results, inputs, functions, "unloaded")
    assert codes.count(200) >= 1, f"the run in flight was not allowed to finish: {codes}"
    assert codes.count(503) >= 1, f"queued requests of an unloaded function were served: {codes}"
    assert server.post_json("/v2/repository/models/unloading/load", {}, token=True).status == 200
    assert_serves(server, functions.heavy, name="unloading")


def test_delete_with_a_request_in_flight(server: Server, functions: Functions, tmp_path: Path):
    server.client().deploy(functions.heavy.variant(tmp_path, name="doomed", max_batch=1))
    inputs = [torch.randn(1, 1024) for _ in range(4)]
    threads, results = _start_requests(server, "doomed", inputs)
    _wait_in_flight(server, "doomed", queued=1)
    r = server.request("DELETE", "/api/v1/functions/doomed", token=True)
    assert r.status == 200, r.body
    _join(threads)
    try:
        codes = _check(results, inputs, functions, "deleted", gone="no function 'doomed'")
        assert codes.count(503) >= 1, f"queued requests of a deleted function were served: {codes}"
    finally:
        assert_serves(server, functions.pair)


def test_redeploy_keeps_serving_without_a_gap(server: Server, functions: Functions, tmp_path: Path):
    """While a new version deploys (its model loaded and prepared: ~1 s for heavy), the old one keeps answering;
    then the new one answers. No request fails, and the version a response names never goes back."""
    client = server.client()
    client.deploy(functions.heavy.variant(tmp_path, name="rolling"))
    new_version = functions.heavy.variant(tmp_path, name="rolling", max_batch=2)
    done: list[Any] = []

    def redeploy() -> None:
        try:
            done.append(client.deploy(new_version))
        except BaseException as e:  # noqa: BLE001 - reported below
            done.append(e)

    t = threading.Thread(target=redeploy)
    t.start()
    versions: list[str] = []
    deadline = time.monotonic() + 60
    while (t.is_alive() or not versions or versions[-1] == "1") and time.monotonic() < deadline:
        x = torch.randn(1, 1024)
        r = infer_json(server, "rolling", {"x": x})
        assert r.status == 200, f"a request during the redeploy failed: HTTP {r.status} {r.body[:300]!r}"
        versions.append(r.json()["model_version"])
        torch.testing.assert_close(outputs_of(r.json())["y"], functions.heavy.expected(x)[0], rtol=1e-4, atol=1e-5)
    t.join(60)
    assert not t.is_alive()
    (info,) = done
    assert isinstance(info, dict) and info["version"] == 2, info
    assert versions[0] == "1" and versions[-1] == "2", versions
    assert versions == sorted(versions), f"a response named an older version after a newer one: {versions}"
    assert server.request("GET", "/v2/models/rolling").json()["versions"] == ["2"]
    client.delete("rolling")
