"""Handler sandboxes with real processes: model calls redirected to real (tiny) models in this process,
failures that stay with their request, isolation that the handler itself observes, scaling, cold starts.

One event loop and one zygote serve the whole module (the zygote imports torch once, ~2 s); every
sandbox is a real forked, isolated process.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import swapserve

from swapserve.errors import OverloadedError
from swapserve.functions.spec import TensorDecl
from swapserve.sandbox import (HandlerError, HandlerLoadError, HandlerOutputError, HandlerTimeoutError, ModelSignature,
                               SandboxConfig, SandboxCrashedError, SandboxLimits, SandboxManager, SandboxMemoryError,
                               SandboxPool, SandboxProtocolError, check_handler_path)
from swapserve.sandbox.isolation import landlock_abi
from swapserve.sandbox.launcher import SpawnLauncher

SIG = ModelSignature((TensorDecl("x", "FP32", (-1, 4)),), (TensorDecl("y", "FP32", (-1, 3)),), max_batch=8)
MODELS = {"encoder": SIG, "scorer": SIG}


class TwoModels:
    """The controller's side of model calls, for tests: two real torch models run in this process, with
    a little latency so that overlapping calls are visible."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.nets = {"encoder": nn.Linear(4, 3).eval(), "scorer": nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()}
        self.delay_s = 0.05
        self.in_flight = 0
        self.max_in_flight = 0
        self.deadlines: list[float] = []
        self.fail_with: Exception | None = None
        self.placed = 0
        """Outputs written into the sandbox's arena through the pool's sink."""

    def expected(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.nets[name](x)

    async def __call__(self, function: str, model: str, inputs: dict[str, torch.Tensor], deadline: float,
                       sink: Any = None) -> dict[str, torch.Tensor]:
        self.deadlines.append(deadline)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            y = self.expected(model, inputs["x"].clone())
            # As the node's dispatcher does: the output written where the pool's sink says (its arena).
            dest = sink.place("y", y) if sink is not None else None
            self.placed += dest is not None
            return {"y": dest.copy_(y) if dest is not None else y}
        finally:
            self.in_flight -= 1


# --- handlers -----------------------------------------------------------------------------------

COMBINE = """
import uuid
import torch
from swapserve.sandbox import Response

TOKEN = uuid.uuid4().hex  # tells sandboxes apart (each is pid 1 of its own namespace)

def setup():
    global SCALE
    SCALE = 2.0

def handle(request, models):
    x = request.inputs["x"]
    a = models["encoder"](x)          # both calls are in flight before either result is asked for
    b = models["scorer"](x=x)
    ya, yb = a.result()["y"], b.result()["y"]
    return Response({"sum": ya + SCALE * yb, "max": torch.maximum(ya, yb)}, {"token": TOKEN})
"""

COMBINE_ASYNC = """
import asyncio

async def handle(request, models):
    x = request.inputs["x"]
    a, b = await asyncio.gather(models["encoder"](x), models["scorer"].call({"x": x}))
    return {"sum": a["y"] + b["y"]}
"""

MISBEHAVE = """
import ctypes, os, time, uuid
import torch

TOKEN = uuid.uuid4().hex

def handle(request, models):
    what = request.json["do"] if request.is_json else "ok"
    if what == "raise":
        raise ValueError("bad pixel value -3")
    if what == "sleep":
        time.sleep(60)
    if what == "alloc":
        return {"n": torch.ones(2 << 30, dtype=torch.uint8).sum().item()}     # 2 GiB
    if what == "alloc_py":
        return {"n": len(bytearray(2 << 30))}
    if what == "segv":
        ctypes.string_at(0)
    if what == "exit":
        os._exit(7)
    if what == "garbage":
        os.write(3, b"\\xff\\xff\\xff\\xff garbage")   # straight into the channel, bypassing the runtime
        time.sleep(60)
    if what == "spin":
        while True:
            pass
    if what == "print":
        print("hello from the handler")
        return {"printed": True}
    if what == "list":
        return [1, 2, 3] if not request.is_json else torch.zeros(1)
    if what == "shape":
        return {"y": models["encoder"](torch.zeros(2, 5)).result()["y"]}
    if what == "shape_caught":
        try:
            models["encoder"](torch.zeros(2, 5))
        except ValueError as e:
            return {"caught": str(e)}
    if what == "model":
        return {"y": models["encoder"](torch.zeros(1, 4)).result()["y"].tolist()}
    return {"token": TOKEN}
"""

PROBE = """
import os, socket, subprocess

def attempt(f):
    try:
        f()
        return "allowed"
    except OSError as e:
        return f"denied ({type(e).__name__})"

def read(path):
    with open(path, "rb") as f:
        f.read(1)

def handle(request, models):
    out = {name: attempt(lambda p=p: read(p)) for name, p in request.json["paths"].items()}
    out["own data"] = attempt(lambda: read("data.txt"))
    out["tcp connect"] = attempt(lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
    out["exec"] = attempt(lambda: subprocess.run(["/bin/true"]))
    out["write own dir"] = attempt(lambda: open("new.txt", "w").close())
    out["cuda"] = __import__("torch").cuda.is_available()
    out["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out
"""

SLOW = """
import time

def handle(request, models):
    time.sleep(request.json.get("sleep", 0.0))
    return "done"
"""

ECHO = """
def handle(request, models):
    return {"echo": request.json, "parameters": request.parameters}
"""


def write_function(root: Path, name: str, code: str, extra: dict[str, str] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "handler.py").write_text(textwrap.dedent(code))
    for fname, text in (extra or {}).items():
        (d / fname).write_text(text)
    return d


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def models() -> TwoModels:
    return TwoModels()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-home")


@pytest.fixture(scope="module")
def manager(loop: asyncio.AbstractEventLoop, models: TwoModels, home: Path) -> Iterator[SandboxManager]:
    cfg = SandboxConfig(timeout_s=10.0, deny_paths=(home,), handler_output="discard",
                        limits=SandboxLimits(memory_bytes=512 << 20))
    m = SandboxManager(models, cfg)
    loop.run_until_complete(m.start())
    yield m
    loop.run_until_complete(m.close())


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Awaitable[Any]], Any]:
    return loop.run_until_complete


@pytest.fixture
def fn_dir(home: Path) -> Callable[..., Path]:
    """A function directory inside the node's home, as the registry lays them out."""

    def make(code: str, extra: dict[str, str] | None = None) -> Path:
        return write_function(home / "functions", f"f{uuid.uuid4().hex[:8]}", code, extra)

    return make


@pytest.fixture(scope="module")
def bystander(manager: SandboxManager, home: Path) -> SandboxPool:
    """Another function, whose requests must succeed while its neighbours misbehave."""
    d = write_function(home / "functions", "bystander", ECHO)
    return manager.add("bystander", d, "handler.py", {})


async def with_bystander(bystander: SandboxPool, work: Awaitable[Any], n: int = 5) -> Any:
    """Run ``work`` while the bystander serves ``n`` requests; they must all succeed, and not wait for it."""
    async def requests() -> float:
        t0 = time.monotonic()
        for i in range(n):
            r = await bystander.infer_json({"i": i})
            assert r.json == {"echo": {"i": i}, "parameters": {}}
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    outcome, took = await asyncio.gather(work, requests(), return_exceptions=True)
    if isinstance(took, BaseException):
        raise took
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def pool_for(manager: SandboxManager, d: Path, **overrides: Any) -> SandboxPool:
    cfg = replace(manager.config, **overrides) if overrides else None
    return manager.add(d.name, d, "handler.py", MODELS, config=cfg)


# --- model calls --------------------------------------------------------------------------------


def test_handler_calls_two_models_and_combines_them(manager: SandboxManager, models: TwoModels, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(COMBINE))
    x = torch.randn(3, 4)
    models.max_in_flight = 0
    placed = models.placed
    deadline = time.monotonic() + 5.0
    r = run(pool.infer({"x": x}, deadline=deadline))
    assert models.placed == placed + 2  # both calls' outputs went straight into the sandbox's arena
    ya, yb = models.expected("encoder", x), models.expected("scorer", x)
    torch.testing.assert_close(r.outputs["sum"], ya + 2.0 * yb)
    torch.testing.assert_close(r.outputs["max"], torch.maximum(ya, yb))
    assert r.model_calls == 2
    assert len(r.parameters["token"]) == 32
    assert models.max_in_flight == 2, "the two model calls should overlap"
    assert models.deadlines[-2:] == [deadline, deadline], "model calls carry the request's deadline"
    assert r.handler_ms < 1000 * 2 * models.delay_s + 500  # overlapped, not 2 x delay + cold start


CHAIN_KEEP = """
import torch

def handle(request, models):
    x = request.inputs["x"]
    kept = [models["encoder"](x * k).result()["y"] for k in (1, 2, 3)]  # each call's outputs apart...
    return {"all": torch.cat([x, *kept], dim=1)}                        # ... and the inputs intact
"""


def test_model_outputs_and_request_inputs_stay_valid_until_handle_returns(manager: SandboxManager,
                                                                           models: TwoModels, fn_dir: Any,
                                                                           run: Any) -> None:
    """Request inputs and each call's outputs are views of the arena: none is overwritten by a later call of
    the same request, and the next request does not see the last one's."""
    pool = pool_for(manager, fn_dir(CHAIN_KEEP))
    for _ in range(2):
        x = torch.randn(2, 4)
        want = torch.cat([x, *(models.expected("encoder", x * k) for k in (1, 2, 3))], dim=1)
        r = run(pool.infer({"x": x}))
        torch.testing.assert_close(r.outputs["all"], want)


def test_async_handler_awaits_model_futures(manager: SandboxManager, models: TwoModels, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(COMBINE_ASYNC))
    x = torch.randn(2, 4)
    models.max_in_flight = 0
    r = run(pool.infer({"x": x}))
    torch.testing.assert_close(r.outputs["sum"], models.expected("encoder", x) + models.expected("scorer", x))
    assert models.max_in_flight == 2


def test_json_route(bystander: SandboxPool, run: Any) -> None:
    r = run(bystander.infer_json({"text": ["a", "b"], "n": 1.5}, {"lang": "en"}))
    assert r.json == {"echo": {"text": ["a", "b"], "n": 1.5}, "parameters": {"lang": "en"}}
    assert r.outputs == {}


def test_model_call_error_reaches_the_client_unchanged(manager: SandboxManager, models: TwoModels, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    models.fail_with = OverloadedError("queue full", retry_after=2.0, http_status=503)
    try:
        with pytest.raises(OverloadedError) as e:
            run(pool.infer_json({"do": "model"}))
    finally:
        models.fail_with = None
    assert e.value.http_status == 503 and e.value.retry_after == 2.0
    assert pool.stats().replaced == 0, "a model's refusal is not the handler's fault"
    assert len(run(pool.infer_json({"do": "model"})).json["y"][0]) == 3


def test_the_documented_example_handler(manager: SandboxManager, models: TwoModels, fn_dir: Any, run: Any) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "handlers.md").read_text()
    code = doc.split("<!-- example-handler -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    pool = pool_for(manager, fn_dir(code))
    rows = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -3.0, 0.25]]
    x = torch.tensor(rows)
    xn = (x - x.mean()) / (x.std() + 1e-6)
    score = models.expected("encoder", xn) + 0.5 * models.expected("scorer", xn)
    r = run(pool.infer({"x": x}))
    torch.testing.assert_close(r.outputs["score"], score)
    assert r.outputs["best"].tolist() == score.argmax(-1).tolist() and r.parameters == {"weight": 0.5}
    j = run(pool.infer_json({"rows": rows})).json
    assert j["best"] == score.argmax(-1).tolist()
    models.fail_with = OverloadedError("queue full", retry_after=1.0)
    try:
        assert run(pool.infer_json({"rows": rows})).json == {"error": "model 'encoder': queue full", "status": 503}
    finally:
        models.fail_with = None


# --- failures stay with their request -----------------------------------------------------------


def test_handler_that_raises(manager: SandboxManager, bystander: SandboxPool, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    first = run(pool.infer_json({"do": "ok"})).json["token"]
    with pytest.raises(HandlerError) as e:
        run(with_bystander(bystander, pool.infer_json({"do": "raise"})))
    assert e.value.http_status == 500
    assert "ValueError: bad pixel value -3" in str(e.value) and "handler.py:" in str(e.value)
    assert "raise ValueError" in e.value.detail  # the tenant's traceback
    assert pool.stats().replaced == 1
    after = run(pool.infer_json({"do": "ok"})).json["token"]
    assert after != first, "the sandbox was replaced"


def test_handler_past_its_timeout_is_killed(manager: SandboxManager, bystander: SandboxPool, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE), timeout_s=0.5)
    run(pool.warm_up(1))
    t0 = time.monotonic()
    with pytest.raises(HandlerTimeoutError) as e:
        run(with_bystander(bystander, pool.infer_json({"do": "sleep"})))
    assert e.value.http_status == 504 and "killed" in str(e.value)
    assert time.monotonic() - t0 < 3.0
    assert pool.stats().replaced == 1
    assert "token" in run(pool.infer_json({"do": "ok"})).json


def test_cancelled_request_does_not_leave_its_sandbox_behind(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    """A client that goes away mid-request: the handler still runs, so its sandbox must not serve the next."""
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    first = run(pool.infer_json({"do": "ok"})).json["token"]

    async def abandon() -> None:
        task = asyncio.ensure_future(pool.infer_json({"do": "sleep"}))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(abandon())
    after = run(pool.infer_json({"do": "ok"})).json["token"]
    assert after != first and pool.stats().replaced == 1


@pytest.mark.parametrize("how", ["alloc", "alloc_py"])
def test_handler_past_its_memory_limit(manager: SandboxManager, bystander: SandboxPool, fn_dir: Any, run: Any, how: str) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE), limits=SandboxLimits(memory_bytes=256 << 20))
    with pytest.raises(SandboxMemoryError) as e:
        run(with_bystander(bystander, pool.infer_json({"do": how})))
    assert e.value.http_status == 500
    assert "memory limit (256 MiB)" in str(e.value)
    assert pool.stats().replaced == 1
    assert "token" in run(pool.infer_json({"do": "ok"})).json


@pytest.mark.parametrize("how,reason", [("segv", "SIGSEGV"), ("exit", "code 7")])
def test_crashing_handler(manager: SandboxManager, bystander: SandboxPool, fn_dir: Any, run: Any, how: str, reason: str) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    with pytest.raises(SandboxCrashedError) as e:
        run(with_bystander(bystander, pool.infer_json({"do": how})))
    assert "died while serving the request" in str(e.value) and reason in str(e.value)
    assert "token" in run(pool.infer_json({"do": "ok"})).json


def test_handler_past_its_cpu_time_limit(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE), limits=SandboxLimits(memory_bytes=512 << 20, cpu_seconds=1))
    with pytest.raises(SandboxCrashedError) as e:
        run(pool.infer_json({"do": "spin"}))
    assert "CPU-time limit (1 s)" in str(e.value)
    assert "token" in run(pool.infer_json({"do": "ok"})).json


def test_handler_output_goes_to_the_log(manager: SandboxManager, fn_dir: Any, run: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    d = fn_dir(MISBEHAVE)
    pool = pool_for(manager, d, handler_output="log")
    with caplog.at_level("INFO", logger="swapserve.sandbox.handler"):
        assert run(pool.infer_json({"do": "print"})).json == {"printed": True}
        run(asyncio.sleep(0.1))
    assert f"[{d.name}] hello from the handler" in caplog.text


def test_garbage_on_the_channel_is_a_protocol_violation(manager: SandboxManager, bystander: SandboxPool, fn_dir: Any,
                                                         run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    with pytest.raises(SandboxProtocolError) as e:
        run(with_bystander(bystander, pool.infer_json({"do": "garbage"})))
    assert "invalid message" in str(e.value)
    assert "token" in run(pool.infer_json({"do": "ok"})).json


# --- bad handlers -------------------------------------------------------------------------------


@pytest.mark.parametrize("code,expect", [
    ("def handle(request, models)\n    return 1\n", "line 1: SyntaxError"),
    ("import no_such_module_xyz\ndef handle(request, models): ...\n", "No module named 'no_such_module_xyz'"),
    ("def setup(): ...\n", "defines no handle(request, models)"),
    ("handle = 3\n", "defines no handle(request, models)"),
    ("def handle(request): ...\n", "must accept two arguments"),
    ("def setup():\n    raise RuntimeError('no vocab file')\ndef handle(request, models): ...\n",
     "setup() failed: RuntimeError: no vocab file"),
])
def test_bad_handler_is_refused_at_deploy(manager: SandboxManager, fn_dir: Any, run: Any, code: str, expect: str) -> None:
    d = fn_dir(code)
    with pytest.raises(HandlerLoadError) as e:
        run(manager.validate(d, "handler.py"))
    assert e.value.http_status == 400
    assert expect in str(e.value)


def test_good_handler_passes_validation(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    info = run(manager.validate(fn_dir(COMBINE), "handler.py", MODELS))
    assert info.has_setup and not info.is_async
    assert info.cold_start.total_ms > 0


def test_handler_path_must_stay_inside_the_function(fn_dir: Any, tmp_path: Path) -> None:
    d = fn_dir(ECHO)
    (tmp_path / "outside.py").write_text(ECHO)
    (d / "link.py").symlink_to(tmp_path / "outside.py")
    for bad in ("../handler.py", "/etc/passwd.py", "handler.txt", "link.py", "missing.py"):
        with pytest.raises(HandlerLoadError) as e:
            check_handler_path(d, bad)
        assert e.value.http_status == 400
    assert check_handler_path(d, "handler.py") == (d / "handler.py").resolve()


def test_bad_handler_fails_each_request_clearly(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir("import no_such_module_xyz\n"))
    for _ in range(2):  # the second is answered at once, without another start
        with pytest.raises(HandlerLoadError) as e:
            run(pool.infer_json({}))
        assert e.value.http_status == 500 and "No module named 'no_such_module_xyz'" in str(e.value)
    assert pool.stats().started == 0


@pytest.mark.parametrize("route", ["tensor", "json"])
def test_wrong_return_type(manager: SandboxManager, fn_dir: Any, run: Any, route: str) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE.replace('what = request.json["do"] if request.is_json else "ok"',
                                                      'what = "list"')))
    call = pool.infer({"x": torch.zeros(1, 4)}) if route == "tensor" else pool.infer_json({})
    with pytest.raises(HandlerOutputError) as e:
        run(call)
    assert e.value.http_status == 500
    assert ("returned list" in str(e.value)) if route == "tensor" else ("returned Tensor on the JSON route" in str(e.value))
    assert pool.stats().replaced == 0


def test_wrong_shape_to_a_model_handle(manager: SandboxManager, models: TwoModels, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(MISBEHAVE))
    calls = len(models.deadlines)
    with pytest.raises(HandlerError) as e:
        run(pool.infer_json({"do": "shape"}))
    assert e.value.http_status == 500
    assert "model 'encoder' input 'x' must have shape [-1, 4]" in str(e.value) and "got [2, 5]" in str(e.value)
    caught = run(pool.infer_json({"do": "shape_caught"})).json["caught"]  # the handler may catch it: a ValueError
    assert "must have shape [-1, 4]" in caught
    assert len(models.deadlines) == calls, "nothing reached the models"


# --- isolation ----------------------------------------------------------------------------------


@pytest.fixture
def secrets(home: Path) -> Iterator[dict[str, str]]:
    """Files a handler must not read: another function's artifact and the registry (in the node's home),
    the host store (/dev/shm/swapserve-*), and a file outside every mount we cover (only Landlock guards it)."""
    other = home / "functions" / "other-tenant" / "v1" / "artifact"
    other.mkdir(parents=True, exist_ok=True)
    (other / "weights.safetensors").write_bytes(b"weights")
    (home / "registry.sqlite3").write_bytes(b"SQLite format 3")
    store = Path("/dev/shm") / f"swapserve-test-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    (store / "store").write_bytes(b"pinned weights")
    loose = Path(tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None, prefix="swapserve-test-"))
    (loose / "secret").write_bytes(b"secret")
    found = {"other function's artifact": str(other / "weights.safetensors"), "registry": str(home / "registry.sqlite3"),
             "host store": str(store / "store"), "unrelated file": str(loose / "secret")}
    checkout = Path(swapserve.__file__).resolve().parents[1] / "pyproject.toml"
    if checkout.is_file():  # a source checkout: only its swapserve/ is readable, not the rest of the repository
        found["source checkout"] = str(checkout)
    yield found
    for p in (store, loose):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()


@pytest.mark.skipif(landlock_abi() == 0, reason="the kernel has no Landlock: file isolation is not enforced here")
def test_handler_cannot_read_other_tenants_the_registry_or_the_store(manager: SandboxManager, bystander: SandboxPool,
                                                                     fn_dir: Any, run: Any, secrets: dict[str, str]) -> None:
    d = fn_dir(PROBE, {"data.txt": "mine"})
    seen = run(with_bystander(bystander, pool_for(manager, d).infer_json({"paths": secrets}))).json
    for name in secrets:
        assert seen[name].startswith("denied"), (name, seen)
    assert seen["own data"] == "allowed"
    assert seen["write own dir"].startswith("denied")
    assert seen["exec"].startswith("denied")
    assert seen["tcp connect"].startswith("denied")
    assert seen["cuda"] is False and seen["CUDA_VISIBLE_DEVICES"] == ""
    # The same handler without isolation reads them all: the denials above are the sandbox's doing.
    unconfined = manager.add(f"{d.name}-unconfined", d, "handler.py", {}, config=replace(manager.config, isolation="off"))
    open_seen = run(unconfined.infer_json({"paths": secrets})).json
    assert all(open_seen[name] == "allowed" for name in secrets), open_seen


# --- pool sizing and cold starts ----------------------------------------------------------------


def test_scale_to_zero_after_idle(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(SLOW), idle_s=0.3, load_window_s=0.3)
    first = run(pool.infer_json({}))
    assert first.cold_start_ms > 0
    assert pool.stats().idle == 1
    run(asyncio.sleep(1.2))
    s = pool.stats()
    assert (s.idle, s.busy, s.stopped_idle) == (0, 0, 1)
    again = run(pool.infer_json({}))
    assert again.cold_start_ms > 0, "a cold start again after scaling to zero"
    warm = run(pool.infer_json({}))
    assert warm.cold_start_ms == 0


def test_warm_pool_follows_recent_concurrency(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(SLOW), max_sandboxes=3, idle_s=0.2, load_window_s=30.0)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(pool.infer_json({"sleep": 0.2}) for _ in range(4)))

    assert [r.json for r in run(burst())] == ["done"] * 4
    s = pool.stats()
    assert s.started == 3 and s.warm_target == 3  # 4 requests, at most 3 sandboxes
    run(asyncio.sleep(0.6))
    assert pool.stats().idle == 3, "recent load keeps them warm past idle_s"


def test_prewarm_starts_sandboxes_off_the_request_path(manager: SandboxManager, fn_dir: Any, run: Any) -> None:
    pool = pool_for(manager, fn_dir(SLOW), max_sandboxes=2)

    async def prewarm() -> int:
        pool.prewarm(2)  # returns at once
        return pool.stats().starting

    assert run(prewarm()) == 2
    run(asyncio.sleep(0.5))
    assert pool.stats().idle == 2
    r = run(pool.infer_json({}))
    assert r.cold_start_ms == 0 and r.wait_ms < 50


def test_cold_start_is_measured(manager: SandboxManager, fn_dir: Any, run: Any, loop: asyncio.AbstractEventLoop) -> None:
    d = fn_dir(COMBINE)
    pool = pool_for(manager, d)
    run(pool.warm_up(1))
    zygote = pool.stats().cold_starts[-1]
    spawned = SandboxPool("spawned", d, "handler.py", MODELS, manager.call_model, SpawnLauncher(), manager.config)
    try:
        run(spawned.warm_up(1))
        spawn = spawned.stats().cold_starts[-1]
    finally:
        run(spawned.close())
    for c in (zygote, spawn):
        assert 0 < c.fork_ms < c.total_ms
        assert c.isolate_ms > 0 and c.import_ms > 0 and c.setup_ms >= 0
    assert zygote.total_ms < spawn.total_ms
    print(f"\ncold start, zygote fork: {zygote}\ncold start, fresh interpreter: {spawn}")
