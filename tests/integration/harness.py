"""Integration harness: the real ``swapserve serve`` as a subprocess, tiny functions to deploy, raw HTTP.

Every server gets a free port, its own home, its own token and its own ``SWAPSERVE_SHM_DIR`` under /dev/shm,
so runs never collide. The main server (``server``) is shared by the whole session and serves two small
functions: ``mlp`` (deployed with the ``swapserve deploy`` CLI) and ``pair`` (two inputs, two outputs, deployed
with ``Client.deploy``). Modules that change what a node serves deploy functions of their own names, or start
their own server (``test_lifecycle.py``, ``test_startup_errors.py``).

The models are tiny (milliseconds to export and run) except ``heavy``: a compute-bound model (~0.1-0.5 s per
forward pass on a CPU, with 4 MiB of weights) used where work must stay in flight long enough to observe
(batching, queue limits, deploy conflicts, shutdown with requests in flight).
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import sys
import tempfile
import time
import uuid

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from swapserve.client import Client
from swapserve.functions.bundle import pack
from swapserve.node.controller import Node, NodeConfig

READY_TIMEOUT_S = 120.0
"""Start to readiness: ~10 s on 2 idle cores (torch imports, the worker's copy probes); generous for busy CI."""
STOP_TIMEOUT_S = 15.0

# -- tiny functions ------------------------------------------------------------------------------------------

MLP_PY = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    torch.manual_seed(1)
    return MLP().eval(), (torch.randn(1, 16),)
'''

PAIR_PY = '''
import torch
from torch import nn


class Pair(nn.Module):
    """Two inputs (floats and token ids), two outputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x, ids):
        y = torch.relu(self.fc(x)) + self.emb(ids).sum(1)
        return y, x.sum(-1, keepdim=True) * 2.0


def build():
    torch.manual_seed(2)
    return Pair().eval(), (torch.randn(1, 8), torch.randint(0, 10, (1, 3)))
'''

HEAVY_PY = '''
import torch
from torch import nn


class Heavy(nn.Module):
    """Compute-bound with few weights: an outer product, then matmuls of 1024 x 1024 activations."""

    def __init__(self, n=1024, depth=12):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n) / n ** 0.5)
        self.head = nn.Linear(n, 8)
        self.depth = depth

    def forward(self, x):
        h = x.unsqueeze(-1) * x.unsqueeze(-2)
        for _ in range(self.depth):
            h = torch.tanh(h @ self.w)
        return self.head(h.mean(1))


def build():
    torch.manual_seed(3)
    return Heavy().eval(), (torch.randn(1, 1024),)
'''


def spec_dict(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    spec = {"name": name, "model": {"python": "model.py:build"}, "slo_ms": 60_000, "max_batch": 8,
            "late_policy": "serve", "max_queue": 64, "inputs": inputs, "outputs": outputs}
    spec.update(over)
    return spec


MLP_SPEC = spec_dict("mlp", [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                     [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])
PAIR_SPEC = spec_dict("pair", [{"name": "x", "datatype": "FP32", "shape": [-1, 8]},
                               {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}],
                      [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                       {"name": "z", "datatype": "FP32", "shape": [-1, 1]}], max_batch=4)
WIDE_PY = '''
import torch
from torch import nn


class Wide(nn.Module):
    """1.25 MiB of output per row from 16 inputs: large outputs without large weights."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 64)

    def forward(self, x):
        y = self.fc(x)
        return torch.cat([y * (i + 1) for i in range(5120)], dim=1)


def build():
    torch.manual_seed(3)
    return Wide(), (torch.randn(1, 16),)
'''
WIDE_SPEC = spec_dict("wide", [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                      [{"name": "y", "datatype": "FP32", "shape": [-1, 327680]}], max_batch=4)
HEAVY_SPEC = spec_dict("heavy", [{"name": "x", "datatype": "FP32", "shape": [-1, 1024]}],
                       [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}], max_batch=4)


def write_function_dir(root: Path, spec: dict[str, Any], model_py: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "function.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "model.py").write_text(model_py)
    return root


def load_local_model(function_dir: Path) -> torch.nn.Module:
    """The function's model built here from its own model.py (seeded: the weights the node serves)."""
    spec = importlib.util.spec_from_file_location(f"_it_model_{uuid.uuid4().hex[:8]}", function_dir / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module, _ = mod.build()
    return module.eval()


@dataclass
class Function:
    """A tiny function: its source directory, its built bundle (a directory) and the model to compare with."""

    name: str
    src: Path
    bundle: Path
    model: torch.nn.Module

    def expected(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.model(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def variant(self, out_root: Path, **spec_changes: Any) -> Path:
        """The same artifact under another function.yaml (another name, SLO, queue...), packed for upload."""
        dest = out_root / f"{spec_changes.get('name', self.name)}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(self.bundle, dest)
        raw = yaml.safe_load((dest / "function.yaml").read_text())
        raw.update(spec_changes)
        (dest / "function.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return pack(dest)

    def archive(self, out_root: Path) -> Path:
        return self.variant(out_root)


@dataclass
class Functions:
    root: Path
    mlp: Function
    pair: Function
    heavy: Function
    wide: Function


# -- processes -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, from /proc; None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below ``pid`` (pid → start time), found by scanning /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (_, ppid, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def still_running(procs: dict[int, int]) -> list[int]:
    """Those of ``procs`` that still exist (same pid and start time) and are not zombies."""
    alive = []
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[0] != "Z":
            alive.append(pid)
    return alive


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self, status: int) -> str:
        """Assert a JSON ``{"error": ...}`` answer with ``status``; return the message."""
        assert self.status == status, f"expected HTTP {status}, got {self.status}: {self.body[:500]!r}"
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = self.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
        return doc["error"]


@dataclass
class Server:
    """One ``swapserve serve`` process."""

    home: Path
    shm_dir: Path
    log_path: Path
    token: str | None = field(default_factory=lambda: f"tok-{uuid.uuid4().hex}")
    """Given with ``--token``; None: let the node generate one (it is then read from ``home/token``)."""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    children: dict[int, int] = field(default_factory=dict)
    """Descendants seen while it ran (pid → start time), for the no-orphans check after it exits."""
    not_ready: list[Response] = field(default_factory=list)
    """Answers of ``GET /v2/health/ready`` seen while waiting for readiness (before the 200)."""
    devices: str = "cpu"
    """``--devices``: ``cpu``, or ``cpu:0,cpu:1,...`` for several CPU workers."""
    extra: tuple[str, ...] = ()
    """More ``serve`` flags."""
    by_env: bool = False
    """Give ``serve`` its address and token as ``SWAPSERVE_URL`` and ``SWAPSERVE_TOKEN``, not as flags."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_")}
        env["SWAPSERVE_SHM_DIR"] = str(self.shm_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> Server:
        """Start the process (returns at once; :meth:`wait_ready` waits)."""
        self.port = free_port()
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "swapserve.cli", "serve", "--devices", self.devices, "--home", str(self.home),
               "--pool", "128MiB", "--host-store", "256MiB", "--workspace", "128MiB"]
        env = self.env()
        if self.by_env:
            env["SWAPSERVE_URL"] = self.url
            if self.token is not None:
                env["SWAPSERVE_TOKEN"] = self.token
        else:
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
            if self.token is not None:
                cmd += ["--token", self.token]
        cmd += self.extra
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.children = {}
        self.not_ready = []
        return self

    def worker_pids(self) -> set[int]:
        """The node's worker processes among the descendants seen so far (multiprocessing's spawned children,
        less its resource tracker)."""
        return {p for p in self.children if "spawn_main" in (c := cmdline(p)) and "resource_tracker" not in c}

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Server:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"swapserve serve exited with {self.proc.returncode} before it was ready; its output:\n"
                            f"{self.log()}")
            try:
                r = self.request("GET", "/v2/health/ready", timeout=2)
                if r.status == 200 and r.json() == {"ready": True}:
                    self.children = descendants(self.pid)
                    if self.token is None:
                        self.token = (self.home / "token").read_text().strip()
                    return self
                self.not_ready.append(r)
                last = f"HTTP {r.status} {r.body[:200]!r}"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        pytest.fail(f"swapserve serve not ready within {timeout:.0f} s (last answer: {last}); its output:\n"
                    f"{self.log()}")

    def signal_stop(self, sig: int = signal.SIGTERM) -> None:
        """Send SIGTERM (remembering the descendants to check for orphans)."""
        assert self.proc is not None
        self.children.update(descendants(self.pid))
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"swapserve serve did not exit within {timeout:.0f} s of SIGTERM; its output:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        self.signal_stop(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """Last-resort cleanup of the processes this harness started (by pid)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.children.update(descendants(self.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in still_running(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- HTTP ------------------------------------------------------------------------------------------------

    def client(self, token: str | None = None, timeout: float = 60.0) -> Client:
        return Client(self.url, token=self.token if token is None else token, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60.0, token: bool | str = False) -> Response:
        """A raw request (http.client: every header and byte under the test's control)."""
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {self.token if token is True else token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def post_json(self, path: str, doc: Any, **kw: Any) -> Response:
        return self.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}, **kw)

    def deploy_cli(self, function_dir: Path, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """``swapserve deploy DIR`` as a user runs it."""
        return self.cli("deploy", str(function_dir), timeout=timeout)

    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """``swapserve ARGS...`` as a user runs it: the console script, configured by the environment."""
        script = Path(sys.executable).with_name("swapserve")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "swapserve.cli"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_")}
        env.update(SWAPSERVE_URL=self.url, SWAPSERVE_TOKEN=self.token or "")
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


def concurrently(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``call(0..n-1)`` on n threads released together; results (or the exceptions raised) in order."""
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = call(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


def assert_stopped_cleanly(s: Server, code: int) -> None:
    """Exit code 0, no process of the node left, nothing left in its SWAPSERVE_SHM_DIR."""
    assert code == 0, f"exit code {code}; output:\n{s.log()}"
    assert s.children, "the node had worker processes"
    # The node's children exit with it; multiprocessing's resource tracker exits when it reads EOF from the pipe
    # the node held, so it may outlive the node by a moment: allow a bounded wait.
    deadline = time.monotonic() + 5
    while (left := still_running(s.children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind by the node: {[(pid, cmdline(pid)) for pid in left]}"
    leftovers = sorted(p.name for p in s.shm_dir.iterdir())
    assert not leftovers, f"shared memory left in {s.shm_dir}: {leftovers}"
    assert "swapserve: stopped" in s.log()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text exposition (0 if absent), matched by name and labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def infer_json(server: Server, name: str, inputs: dict[str, torch.Tensor], **extra: Any) -> Response:
    """An OIP JSON infer request built by hand (flat row-major data)."""
    doc = {"inputs": [{"name": n, "shape": list(t.shape), "datatype": DATATYPE[t.dtype],
                       "data": t.reshape(-1).tolist()} for n, t in inputs.items()], **extra}
    return server.post_json(f"/v2/models/{name}/infer", doc)


DATATYPE = {torch.float32: "FP32", torch.int64: "INT64", torch.float16: "FP16", torch.int32: "INT32"}


def outputs_of(doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """JSON outputs of an infer response as float32 tensors of their shapes."""
    return {o["name"]: torch.tensor(o["data"], dtype=torch.float32).reshape(o["shape"]) for o in doc["outputs"]}


def wait_busy(server: Server, what: str, timeout_s: float = 30.0, poll_s: float = 0.005) -> None:
    """Return once the node's (first) device is busy; fail with ``what`` never got in flight."""
    until = time.monotonic() + timeout_s
    while not server.client().status()["devices"][0]["busy"]:
        assert time.monotonic() < until, f"{what} never got in flight"
        time.sleep(poll_s)


def second_while_first_runs(server: Server, first: Callable[[], None], second: Callable[[], None]) -> None:
    """``first`` on a thread; once the node's device is busy with it, ``second`` on another; both joined."""
    a = threading.Thread(target=first)
    a.start()
    wait_busy(server, "the first request", poll_s=0.002)
    b = threading.Thread(target=second)
    b.start()
    a.join(60)
    b.join(60)


def assert_serves(server: Server, fn: Function, seed: int = 0, name: str | None = None) -> None:
    """``name`` (default ``fn.name``) answers a fresh request exactly as the model computes it here."""
    g = torch.Generator().manual_seed(seed)
    if fn.name == "pair":
        inputs = {"x": torch.randn(2, 8, generator=g), "ids": torch.randint(0, 10, (2, 3), generator=g)}
    elif fn.name == "heavy":
        inputs = {"x": torch.randn(1, 1024, generator=g)}
    else:
        inputs = {"x": torch.randn(2, 16, generator=g)}
    r = infer_json(server, name or fn.name, inputs)
    assert r.status == 200, f"{name or fn.name} did not answer: HTTP {r.status} {r.body[:300]!r}"
    got = outputs_of(r.json())
    for decl, want in zip(yaml.safe_load((fn.bundle / "function.yaml").read_text())["outputs"],
                          fn.expected(*inputs.values())):
        torch.testing.assert_close(got[decl["name"]], want, rtol=1e-4, atol=1e-5)


def serve_mlp_and_pair(s: Server, fns: Functions, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wait for ``s`` to be ready, then deploy ``mlp`` with the ``swapserve deploy`` CLI and ``pair`` with
    ``Client.deploy`` (what the shared ``server`` fixture serves)."""
    s.wait_ready()
    done = s.deploy_cli(fns.mlp.src)
    assert done.returncode == 0, f"swapserve deploy failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n" \
                                 f"server log:\n{s.log()}"
    assert "mlp: version 1, READY" in done.stdout, done.stdout
    info = deploy(s, fns.pair.archive(tmp_path_factory.mktemp("archives")))
    assert (info["name"], info["state"]) == ("pair", "READY"), info


def deploy(server: Server, archive: Path) -> dict[str, Any]:
    return server.client().deploy(archive)


def shm_root() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def in_node(monkeypatch: pytest.MonkeyPatch, cfg: NodeConfig, body: Callable[[Node], Awaitable[None]],
            grace_s: float = 5.0) -> None:
    """Run ``body`` against a real Node in this process (its workers real processes, its shared memory in a
    directory of its own), started before and stopped after (with ``grace_s`` for what is in flight)."""
    shm = shm_root() / f"swapserve-it-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("SWAPSERVE_SHM_DIR", str(shm))

    async def main() -> None:
        node = Node(cfg)
        await node.start()
        try:
            await body(node)
        finally:
            await node.stop(grace_s)

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def new_server(tmp: Path) -> Server:
    shm = shm_root() / f"swapserve-it-{uuid.uuid4().hex[:10]}"
    shm.mkdir()
    return Server(home=tmp / "home", shm_dir=shm, log_path=tmp / "server.log")


