"""Start a real ``swapserve serve`` process for a benchmark, and stop it cleanly. Shared by the node
benchmarks (overhead.py, trace.py): the server runs as its own process, clients talk HTTP to it."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it exits (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_list(text: str) -> set[int]:
    """CPUs written as ``taskset -c`` takes them: ``0-7``, ``0,2,4``, ``0-3,8-11``. Raises ValueError."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first < 0 or last < first:
            raise ValueError(f"not a CPU range: {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


class Server:
    """``swapserve serve`` in a subprocess (its log in ``home/serve.log``)."""

    def __init__(self, home: Path, devices: str, *, token: str = "bench-token", pool: str | None = None,
                 workspace: str = "2GiB", host_store: str | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, cpus: set[int] | None = None):
        """``cpus``: the CPUs the node's processes may run on (its workers inherit them); default all."""
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "swapserve.cli", "serve", "--home", str(home), "--port", str(self.port),
                "--devices", devices, "--token", token, "--workspace", workspace, *extra]
        if pool:
            args += ["--pool", pool]
        if host_store:
            args += ["--host-store", host_store]
        self.log = open(home / "serve.log", "ab")
        def before_exec() -> None:
            # The node stops (cleanly, as on SIGTERM) when the benchmark dies: one killed by a timeout left its
            # node preparing models at full CPU for as long as nobody noticed.
            _term_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                     preexec_fn=before_exec)

    def wait_ready(self, timeout: float = 1800.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f} s; log:\n{self.tail()}")

    def front_pids(self) -> list[int]:
        """The node's HTTP front processes (serve --fronts)."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"swapserve.fronts.front" in cmd:
                found.append(int(entry))
        return sorted(found)

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        lines = (self.home / "serve.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


TINY_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), (torch.randn(1, 64),)
'''

TINY_SPEC = '''name: {name}
model:
  python: model.py:build
slo_ms: {slo_ms}
max_batch: {max_batch}
late_policy: serve
max_queue: 4096
inputs:
  - {{name: x, datatype: FP32, shape: [-1, 64]}}
outputs:
  - {{name: y, datatype: FP32, shape: [-1, 16]}}
'''


def tiny_function(directory: Path, name: str, slo_ms: float = 100.0, max_batch: int = 8) -> Path:
    """A function directory with a tiny MLP (64 → 64 → 16), for overhead measurements."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(TINY_MODEL)
    (directory / "function.yaml").write_text(TINY_SPEC.format(name=name, slo_ms=slo_ms, max_batch=max_batch))
    return directory
