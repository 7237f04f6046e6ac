"""Overload and conflicts against the real node: a full queue (429), an SLO that cannot be met (503), both with
Retry-After, and a second deploy of a name while one is in flight (409). Uses the compute-bound ``heavy`` model
(a fraction of a second per run on a CPU) so that work is reliably in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .harness import (Functions, Response, Server, assert_serves, concurrently, infer_json, metric,
                      second_while_first_runs)

pytestmark = pytest.mark.integration


def _retry_after(r: Response) -> int:
    value = r.headers.get("retry-after")
    assert value is not None, f"HTTP {r.status} without Retry-After: {r.headers}"
    assert value.isdigit() and int(value) >= 1, value
    return int(value)


def test_full_queue_gets_429_with_retry_after(server: Server, functions: Functions, tmp_path: Path):
    info = server.client().deploy(functions.heavy.variant(tmp_path, name="q1", max_queue=1, max_batch=1))
    assert info["spec"]["max_queue"] == 1
    n = 8
    inputs = [torch.randn(1, 1024) for _ in range(n)]
    # The first runs before the other seven leave together (sent all at once, they can all reach the node
    # before it decides, which it does a couple of loop turns after an arrival: then the first waits in the
    # queue of one and the seven others are refused). Of the seven, one waits in the queue (or runs in the
    # side lane meanwhile), and the rest arrive while every place is taken.
    results: list[Any] = [None] * n

    def first() -> None:
        results[0] = infer_json(server, "q1", {"x": inputs[0]})

    def others() -> None:
        results[1:] = concurrently(n - 1, lambda i: infer_json(server, "q1", {"x": inputs[i + 1]}))

    second_while_first_runs(server, first, others)
    assert all(isinstance(r, Response) for r in results), results
    codes = sorted(r.status for r in results)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    for i, r in enumerate(results):
        if r.status == 429:
            assert "max_queue" in r.error(429)
            _retry_after(r)
        else:
            got = torch.tensor(r.json()["outputs"][0]["data"]).reshape(1, 8)
            torch.testing.assert_close(got, functions.heavy.expected(inputs[i])[0], rtol=1e-4, atol=1e-5)
    # Once the queue has drained the function serves again.
    assert_serves(server, functions.heavy, name="q1")


def test_unmeetable_slo_gets_503_with_retry_after(server: Server, functions: Functions, tmp_path: Path):
    """slo_ms 1 with late_policy refuse, for a model whose resident run (measured at deploy) takes far longer:
    refused at admission, whether warm or cold (cold-start grace only forgives the copy, not the compute)."""
    info = server.client().deploy(functions.heavy.variant(tmp_path, name="strict", slo_ms=1, late_policy="refuse"))
    assert (info["spec"]["slo_ms"], info["spec"]["late_policy"]) == (1, "refuse")
    x = torch.randn(1, 1024)
    for _ in range(3):
        r = infer_json(server, "strict", {"x": x})
        assert "deadline" in r.error(503)
        _retry_after(r)
    metrics = server.request("GET", "/metrics").body.decode()
    assert metric(metrics, "swapserve_slo_misses_total", function="strict") == 3
    assert metric(metrics, "swapserve_requests_total", function="strict", code="503") == 3
    assert metric(metrics, "swapserve_requests_total", function="strict", code="200") == 0


def test_second_deploy_of_a_name_in_flight_gets_409(server: Server, functions: Functions, tmp_path: Path):
    """Two uploads of one name at once: the node claims the name before it loads the model (and runs it twice
    to prepare it: ~1 s for ``heavy``), so whichever claims it second is refused at once with 409."""
    archives = [functions.heavy.variant(tmp_path, name="race"), functions.heavy.variant(tmp_path, name="race")]
    client = server.client()

    def upload(i: int) -> dict[str, Any]:
        return client.deploy(archives[i])

    from swapserve.client import ClientError

    results = concurrently(2, upload)
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, ClientError)]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0].status == 409 and "in flight" in refused[0].message
    assert ok[0]["version"] == 1
    assert server.client().get_function("race")["version"] == 1, "the refused deploy left no version behind"
    assert_serves(server, functions.heavy, name="race")
    # Once the first has finished, a deploy of the name succeeds again.
    assert client.deploy(archives[0])["version"] == 2
