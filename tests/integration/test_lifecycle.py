"""A node's life: SIGTERM while requests are in flight (they finish or get a clear 503, the process exits 0,
leaves no child process and removes its shared memory), then a restart on the same home that brings every
function back — serving the same outputs — and keeps an unloaded function unloaded.

Runs its own node (not the shared one), started twice on one home.
"""

from __future__ import annotations

import re
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from swapserve.functions.build import build_bundle
from swapserve.functions.bundle import pack

from .harness import (MLP_PY, MLP_SPEC, Functions, Response, Server, assert_serves, assert_stopped_cleanly, cmdline,
                      infer_json, metric, outputs_of, still_running, wait_busy, write_function_dir)

pytestmark = pytest.mark.integration

PROBES = {"keep": {"x": torch.linspace(-2, 2, 32).reshape(2, 16)},
          "heavy": {"x": torch.linspace(-1, 1, 1024).reshape(1, 1024)},
          "doubled": {"x": torch.linspace(-1, 3, 16).reshape(1, 16)}}
"""Fixed inputs whose outputs must be the same before and after the restart."""


@dataclass
class Node:
    server: Server
    before: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Outputs of PROBES on the first run."""
    stopped_cleanly: bool = False


def _probe(server: Server, name: str) -> dict[str, torch.Tensor]:
    r = infer_json(server, name, PROBES[name])
    assert r.status == 200, f"{name}: HTTP {r.status} {r.body[:300]!r}"
    return outputs_of(r.json())


@pytest.fixture(scope="module")
def node(server_factory: Callable[..., Server], functions: Functions, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Node]:
    """First run, without --token (the node makes one): keep (mlp, deployed twice: version 2), heavy, parked
    (pair, unloaded), gone (deleted) and doubled (mlp's model behind a handler: its sandboxes and zygote are
    processes of the node too)."""
    s = server_factory(token=False).start()
    archives = tmp_path_factory.mktemp("lifecycle-archives")
    src = write_function_dir(archives / "doubled", dict(MLP_SPEC, name="doubled", handler="handler.py"), MLP_PY)
    (src / "handler.py").write_text("def handle(request, models):\n"
                                    "    (y,) = models['model'](request.inputs['x']).result().values()\n"
                                    "    return {'y': 2 * y}\n")
    build_bundle(src, archives / "doubled-bundle", progress=lambda line: None)
    s.wait_ready()
    client = s.client()
    assert client.deploy(pack(archives / "doubled-bundle"))["state"] == "READY"
    for fn, name in ((functions.mlp, "keep"), (functions.heavy, "heavy"), (functions.pair, "parked"),
                     (functions.mlp, "keep"), (functions.mlp, "gone")):
        assert client.deploy(fn.variant(archives, name=name))["state"] == "READY"
    assert client.get_function("keep")["version"] == 2
    client.delete("gone")
    r = s.post_json("/v2/repository/models/parked/unload", {}, token=True)
    assert r.status == 200 and r.json()["state"] == "UNAVAILABLE", r.body
    node = Node(s)
    for name in PROBES:
        node.before[name] = _probe(s, name)
    yield node


@pytest.fixture(scope="module")
def restarted(node: Node) -> Iterator[Server]:
    """The same home, started again (after the first run is stopped, by the shutdown test or here)."""
    s = node.server
    if s.proc is not None and s.proc.poll() is None:
        assert_stopped_cleanly(s, s.stop())
    s.start().wait_ready()
    yield s
    assert_stopped_cleanly(s, s.stop(signal.SIGINT))  # Ctrl-C stops it the same way


def test_generated_token(node: Node):
    s = node.server
    path = s.home / "token"
    assert path.stat().st_mode & 0o777 == 0o600, oct(path.stat().st_mode)
    assert s.token and len(s.token) >= 16
    assert f"export SWAPSERVE_TOKEN={s.token}" in s.log()
    assert s.request("GET", "/api/v1/status", token=True).status == 200
    s.request("GET", "/api/v1/status", token="guess").error(403)


def test_sigterm_with_requests_in_flight(node: Node, functions: Functions):
    s = node.server
    assert [p.name for p in s.shm_dir.iterdir()], "the node keeps its host store under SWAPSERVE_SHM_DIR"
    n = 6
    inputs = [torch.randn(1, 1024) for _ in range(n)]
    results: list[Response | BaseException | None] = [None] * n

    def call(i: int) -> None:
        try:
            results[i] = infer_json(s, "heavy", {"x": inputs[i]})
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    wait_busy(s, "no request", timeout_s=20, poll_s=0.01)

    t0 = time.monotonic()
    s.signal_stop()
    # While it drains, the node is not ready and refuses new work clearly (or has already closed its port).
    while time.monotonic() < t0 + 10:
        try:
            r = s.request("GET", "/v2/health/ready", timeout=5)
        except OSError:
            break
        if r.status == 503:
            assert r.json()["ready"] is False
            try:
                late = infer_json(s, "keep", PROBES["keep"])
            except OSError:
                break
            assert "shutting down" in late.error(503) or "not ready" in late.error(503)
            break
        time.sleep(0.01)

    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a request hung through the shutdown"
    code = s.wait_exit()
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    served = 0
    for i, r in enumerate(results):
        assert isinstance(r, Response), f"request {i} got no HTTP answer: {r!r}"
        if r.status == 200:
            served += 1
            got = outputs_of(r.json())["y"]
            torch.testing.assert_close(got, functions.heavy.expected(inputs[i])[0], rtol=1e-4, atol=1e-5)
        else:  # queued when the stop began, or (on a busy machine) reaching the node only after it began
            msg = r.error(503)
            assert "shutting down" in msg or "not ready" in msg, msg
    assert served >= 1, "the request in flight at SIGTERM was not allowed to finish"
    assert_stopped_cleanly(s, code)
    node.stopped_cleanly = True


def test_restart_brings_functions_back(node: Node, restarted: Server, functions: Functions):
    s = restarted
    # Readiness said no (JSON, 503) until the registered functions were loaded; then every one answers at once.
    assert s.not_ready and all(r.error(503) and r.json()["ready"] is False for r in s.not_ready)
    assert s.request("GET", "/api/v1/status", token=True).status == 200, "the token kept in the home still works"
    loaded = re.findall(r"loaded (\d+) of (\d+) functions .*; a model's fill ([\d.]+) s, its preparation on the "
                        r"workers ([\d.]+) s, .*; a worker's first runs of one \(swap in, graph capture\) ([\d.]+) s",
                        s.log())  # start-up progress, the last line whole, with its split
    assert loaded and loaded[-1][0] == loaded[-1][1] and float(loaded[-1][3]) > 0, s.log()
    assert float(loaded[-1][4]) <= float(loaded[-1][3]), "a worker's own time on a model is within its load's"
    listed = {f["name"]: f for f in s.client().list_functions()}
    assert listed["keep"]["state"] == "READY" and listed["keep"]["version"] == 2, "the last deployed version"
    assert "gone" not in listed, "a deleted function stays deleted"
    s.request("GET", "/v2/models/gone").error(404)
    assert s.request("GET", "/v2/models/keep").json()["versions"] == ["2"]
    assert listed["heavy"]["state"] == "READY"
    for name in PROBES:
        after = _probe(s, name)
        assert after.keys() == node.before[name].keys()
        for k in after:
            torch.testing.assert_close(after[k], node.before[name][k], rtol=0, atol=0)
    assert_serves(s, functions.mlp, seed=21, name="keep")
    assert_serves(s, functions.heavy, seed=22, name="heavy")
    x = PROBES["doubled"]["x"]
    torch.testing.assert_close(_probe(s, "doubled")["y"], 2 * functions.mlp.expected(x)[0], rtol=1e-5, atol=1e-6)


def test_unloaded_function_does_not_serve_after_restart(restarted: Server):
    s = restarted
    r = infer_json(s, "parked", {"x": torch.randn(1, 8), "ids": torch.zeros(1, 3, dtype=torch.int64)})
    assert r.status != 200
    ready = {e["name"] for e in s.post_json("/v2/repository/index", {"ready": True}).json()}
    assert "parked" not in ready and "keep" in ready


def test_unloaded_function_stays_registered_and_loadable_after_restart(restarted: Server, functions: Functions):
    s = restarted
    index = {e["name"]: e for e in s.post_json("/v2/repository/index", {}).json()}
    assert index.get("parked", {}).get("state") == "UNAVAILABLE", index
    r = s.request("GET", "/v2/models/parked/ready")
    assert r.status == 400 and r.json()["ready"] is False
    assert s.client().get_function("parked")["state"] == "UNAVAILABLE"
    infer_json(s, "parked", {"x": torch.randn(1, 8), "ids": torch.zeros(1, 3, dtype=torch.int64)}).error(503)
    r = s.post_json("/v2/repository/models/parked/load", {}, token=True)
    assert r.status == 200 and r.json()["state"] == "READY", r.body
    assert_serves(s, functions.pair, name="parked")


def test_worker_death_is_reported_not_hung_and_the_worker_started_again(restarted: Server, functions: Functions):
    """Last on this node: its worker process dies (SIGKILL) during a run. The request in flight gets a JSON error,
    the node says it is not ready and refuses new work at once; then it starts the worker again, adds its models
    there, and serves them as before; and SIGTERM still stops it cleanly (checked when the fixture ends)."""
    s = restarted
    # multiprocessing's spawned children: the worker, and the resource tracker (whose command line names it); and
    # the handler's zygote and sandboxes.
    (worker,) = [pid for pid in still_running(s.children)
                 if "resource_tracker" not in cmdline(pid) and "swapserve.sandbox" not in cmdline(pid)]
    result: list[Response | BaseException] = []

    def call() -> None:
        try:
            result.append(infer_json(s, "heavy", {"x": torch.randn(1, 1024)}))
        except BaseException as e:  # noqa: BLE001 - reported below
            result.append(e)

    t = threading.Thread(target=call)
    t.start()
    wait_busy(s, "the request", timeout_s=20, poll_s=0.01)
    os.kill(worker, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "the request in flight hung when its worker died"
    (r,) = result
    assert isinstance(r, Response), r
    assert r.status in (500, 503) and "worker" in r.error(r.status), r.body
    assert s.request("GET", "/v2/health/live").status == 200
    r = s.request("GET", "/v2/health/ready")
    assert r.status == 503 and r.json()["ready"] is False
    r = infer_json(s, "keep", PROBES["keep"])
    assert "starting again" in r.error(503) and r.headers.get("retry-after") == "5", r.headers
    deadline = time.monotonic() + 60
    while s.request("GET", "/v2/health/ready").status != 200:
        assert time.monotonic() < deadline, "the node did not start its worker again within 60 s"
        time.sleep(0.1)
    assert "worker 0 (cpu) died; starting it again (1 of 3)" in s.log()
    assert_serves(s, functions.mlp, seed=22, name="keep")
    assert_serves(s, functions.heavy, seed=23)
    metrics = s.request("GET", "/metrics").body.decode()
    assert metric(metrics, "swapserve_worker_restarts_total", device="cpu") == 1
