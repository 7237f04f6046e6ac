"""A node with HTTP fronts (``serve --fronts 2``): every OIP, bad-input and handler test again, through the
fronts, and what only fronts have — processes of their own, a dead front replaced, the port refused to a second node, a
clean stop with requests in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from .harness import (Functions, Server, assert_serves, assert_stopped_cleanly, cmdline, concurrently, descendants,
                      metric, new_server, serve_mlp_and_pair, wait_busy)
from .test_bad_input import *  # noqa: F401,F403 - collected again here, against the fronted node
from .test_handlers import *  # noqa: F401,F403
from .test_oip import *  # noqa: F401,F403

del test_models_come_in_while_the_sandbox_starts  # noqa: F821 - starts a node of its own, without fronts

pytestmark = pytest.mark.integration

FRONTS = 2
FRONT_MODULE = "swapserve.fronts.front"


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server], request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """This module's node (it replaces the shared one for the tests imported above): mlp and pair, served
    through two front processes."""
    s = server_factory(extra=("--fronts", str(FRONTS))).start()
    serve_mlp_and_pair(s, request.getfixturevalue("functions"), tmp_path_factory)
    yield s
    assert_stopped_cleanly(s, s.stop())


def fronts(s: Server) -> list[int]:
    return sorted(pid for pid in descendants(s.pid) if FRONT_MODULE in cmdline(pid))


def test_the_fronts_are_processes_of_their_own(server: Server):
    assert len(fronts(server)) == FRONTS, [(p, cmdline(p)) for p in descendants(server.pid)]
    assert f"({FRONTS} HTTP processes)" in server.log()


def test_a_scrape_counts_requests_served_by_every_front(server: Server, functions: Functions):
    """Requests on fresh connections spread over both fronts; each front's observations reach the one
    registry before the scrape answers."""
    before = server.request("GET", "/metrics").body.decode()
    n = 24
    for i in range(n):
        assert_serves(server, functions.mlp, seed=i)
    after = server.request("GET", "/metrics").body.decode()
    served = (metric(after, "swapserve_requests_total", function="mlp", code="200")
              - metric(before, "swapserve_requests_total", function="mlp", code="200"))
    assert served == n
    http = (metric(after, "swapserve_http_requests_total", route="/v2/models/{name}/infer", method="POST", code="200")
            - metric(before, "swapserve_http_requests_total", route="/v2/models/{name}/infer", method="POST",
                     code="200"))
    assert http == n


def test_the_run_log_through_every_front_is_the_controller_s(server: Server, functions: Functions):
    """Requests on fresh connections spread over both fronts; whichever answers ``GET /api/v1/runs`` asks the
    controller, whose log has every run."""
    since = server.client().runs()["now"]
    for i in range(6):
        assert_serves(server, functions.mlp, seed=i)
    logs = [server.client().runs(since=since) for _ in range(4)]
    for log in logs:
        ran = [dict(zip(log["fields"], r)) for r in log["runs"]]
        assert sum(r["requests"] for r in ran if r["function"] == "mlp" and r["kind"] == "run") == 6, ran


def test_a_killed_front_is_replaced_and_serving_goes_on(server: Server, functions: Functions):
    victim, survivor = fronts(server)
    server.children.update(descendants(server.pid))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (now := fronts(server)) == [survivor] or victim in now or len(now) < FRONTS:
        assert time.monotonic() < deadline, f"no front replaced the killed one; log:\n{server.log()}"
        for i in range(3):  # the survivor serves meanwhile
            assert_serves(server, functions.pair, seed=i)
        time.sleep(0.2)
    assert survivor in now and len(now) == FRONTS
    assert "HTTP front" in server.log() and "starting another" in server.log()
    results = concurrently(16, lambda i: server.client().infer("mlp", {"x": torch.full((1, 16), float(i))}))
    for i, out in enumerate(results):
        assert not isinstance(out, BaseException), out
        torch.testing.assert_close(out["y"], functions.mlp.expected(torch.full((1, 16), float(i)))[0])


def test_a_second_node_cannot_take_the_fronted_port(server: Server, tmp_path_factory: pytest.TempPathFactory):
    other = new_server(tmp_path_factory.mktemp("second"))
    cmd = [sys.executable, "-m", "swapserve.cli", "serve", "--devices", "cpu", "--host", "127.0.0.1", "--port",
           str(server.port), "--home", str(other.home), "--fronts", "2", "--token", "t"]
    done = subprocess.run(cmd, env=other.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert f"cannot listen on 127.0.0.1:{server.port}" in done.stderr, done.stderr
    assert not list(other.shm_dir.iterdir())
    other.shm_dir.rmdir()


def test_stop_finishes_requests_in_flight_then_leaves_nothing(server_factory: Callable[..., Server],
                                                               functions: Functions,
                                                               tmp_path_factory: pytest.TempPathFactory):
    s = server_factory(extra=("--fronts", str(FRONTS))).start()
    serve_mlp_and_pair(s, functions, tmp_path_factory)
    info = s.client().deploy(functions.heavy.archive(tmp_path_factory.mktemp("heavy")))
    assert info["state"] == "READY"
    assert len(fronts(s)) == FRONTS
    x = torch.randn(1, 1024)
    results: list[object] = []

    def slow_call(_: int) -> object:
        return s.client().infer("heavy", {"x": x})

    t = threading.Thread(target=lambda: results.extend(concurrently(4, slow_call)))
    t.start()
    wait_busy(s, "heavy's request", poll_s=0.01)
    s.signal_stop()
    t.join(60)
    assert len(results) == 4
    for out in results:  # each finished (the grace period) or was refused cleanly
        if isinstance(out, BaseException):
            assert "503" in str(out) or "shutting down" in str(out), out
        else:
            torch.testing.assert_close(out["y"], functions.heavy.expected(x)[0])
    assert any(not isinstance(out, BaseException) for out in results), results
    assert_stopped_cleanly(s, s.wait_exit())

