"""Starting sandbox processes: forked from a zygote (fast, the default) or spawned as fresh interpreters.

Either way a sandbox gets exactly three descriptors — its channel, its arena and its output pipe — and
a clean environment; it isolates itself (:mod:`swapserve.sandbox.isolation`) before it reads tenant code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from swapserve.sandbox.config import SandboxLimits
from swapserve.sandbox.errors import SandboxStartError
from swapserve.sandbox.protocol import Arena

log = logging.getLogger(__name__)

_ROOT = str(Path(__file__).resolve().parents[2])


def _python(module: str, call: str) -> list[str]:
    """``python -I`` (no PYTHON* variables, no user site, no cwd on sys.path) running ``module.call`` from
    this very swapserve, installed or not."""
    code = f"import sys; sys.path.insert(0, {_ROOT!r}); from {module} import {call.split('(')[0]}; {call}"
    return [sys.executable, "-I", "-c", code]


def sandbox_env(limits: SandboxLimits, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a sandbox: nothing of the server's, no GPU, bounded thread pools."""
    threads = str(limits.threads)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "CUDA_VISIBLE_DEVICES": "",
        "HIP_VISIBLE_DEVICES": "",
        "ROCR_VISIBLE_DEVICES": "",
        "NVIDIA_VISIBLE_DEVICES": "void",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena: keep RLIMIT_AS for data
        # Tensors up to 32 MiB from the heap, kept there when freed: copying a model's outputs out of the arena
        # then reuses warm pages instead of faulting in fresh ones on every call.
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
    }
    env.update(extra or {})
    return env


@dataclass
class SandboxProcess:
    pid: int
    """The process the launcher started (with a PID namespace, the shim whose child is the sandbox)."""
    channel: socket.socket
    """The pool's end of the sandbox's stream socket (non-blocking)."""
    arena: Arena
    output: int
    """Read end of the sandbox's stdout/stderr pipe; -1 when output is discarded."""
    exited: asyncio.Future[int]
    """Resolves with the exit status once the process is gone: 128+N for signal N, -1 if unknown."""
    _kill: Callable[[], None] = field(repr=False)
    started: float = 0.0
    """``time.perf_counter()`` when the launch was asked for."""

    def kill(self) -> None:
        """SIGKILL (idempotent): the sandbox and every process in its PID namespace."""
        if not self.exited.done():
            self._kill()


class Launcher(Protocol):
    async def launch(self, arena_bytes: int, keep_output: bool) -> SandboxProcess: ...

    async def close(self) -> None: ...


def _pipes(arena_bytes: int, keep_output: bool) -> tuple[Arena, socket.socket, socket.socket, int, int]:
    arena = Arena.create(arena_bytes)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    if keep_output:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
    else:
        out_r, out_w = -1, os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    return arena, ours, theirs, out_r, out_w


class ZygoteLauncher:
    """One zygote per launcher, started on first use (or by :meth:`start`) and again if it dies."""

    def __init__(self, limits: SandboxLimits | None = None, start_timeout_s: float = 120.0):
        self.env = sandbox_env(limits or SandboxLimits())
        self.start_timeout_s = start_timeout_s
        self.start_ms = 0.0
        """Time the zygote took to start (mostly importing torch)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._forks: dict[int, asyncio.Future[tuple[int, asyncio.Future[int]]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._ids = itertools.count(1)

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._ready is not None and self._ready.done() and not self._ready.exception()

    async def start(self) -> None:
        if self._ready is None or (self._ready.done() and self._sock is None):
            self._spawn()
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.start_timeout_s)
        except asyncio.TimeoutError:
            self._on_dead("did not start in time")
            raise SandboxStartError(f"the sandbox zygote did not start within {self.start_timeout_s:.0f} s") from None

    def _spawn(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t0 = time.perf_counter()
        # From the event loop's thread: the zygote's death signal fires when the thread that forked it ends.
        self._proc = subprocess.Popen(_python("swapserve.sandbox.zygote", f"main({child.fileno()})"),
                                      pass_fds=[child.fileno()], env=self.env, stdin=subprocess.DEVNULL, cwd="/",
                                      start_new_session=True)
        child.close()
        parent.setblocking(False)
        self._sock = parent
        self._ready = loop.create_future()
        self._t0 = t0
        loop.add_reader(parent.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._on_dead("exited")
                return
            msg = json.loads(data)
            op = msg.get("op")
            if op == "ready" and self._ready is not None and not self._ready.done():
                self.start_ms = (time.perf_counter() - self._t0) * 1e3
                log.info("sandbox zygote up in %.0f ms (pid %d)", self.start_ms, msg["pid"])
                self._ready.set_result(None)
            elif op == "forked":
                exited = asyncio.get_running_loop().create_future()
                self._exits[msg["pid"]] = exited
                fut = self._forks.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result((msg["pid"], exited))
            elif op == "exit":
                exited = self._exits.pop(msg["pid"], None)
                if exited is not None and not exited.done():
                    exited.set_result(int(msg["status"]))

    def _on_dead(self, why: str) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError, OSError):
                pass
            self._sock.close()
            self._sock = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SandboxStartError(f"the sandbox zygote {why} while starting"))
            self._ready.exception()  # retrieved here; start() raises its own error
        err = SandboxStartError(f"the sandbox zygote {why}")
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(err)
        for exited in self._exits.values():  # its sandboxes died with it (death signal)
            if not exited.done():
                exited.set_result(-1)
        self._forks.clear()
        self._exits.clear()
        if self._proc is not None:
            self._proc.poll()

    async def launch(self, arena_bytes: int, keep_output: bool) -> SandboxProcess:
        t0 = time.perf_counter()
        await self.start()
        arena, ours, theirs, out_r, out_w = _pipes(arena_bytes, keep_output)
        fid = next(self._ids)
        fut: asyncio.Future[tuple[int, asyncio.Future[int]]] = asyncio.get_running_loop().create_future()
        self._forks[fid] = fut
        try:
            assert self._sock is not None
            socket.send_fds(self._sock, [json.dumps({"op": "fork", "id": fid}).encode()], [theirs.fileno(), arena.fd, out_w])
            pid, exited = await asyncio.wait_for(fut, 30.0)
        except BaseException as e:
            self._forks.pop(fid, None)
            arena.close()
            ours.close()
            if out_r >= 0:
                os.close(out_r)
            if isinstance(e, (OSError, asyncio.TimeoutError)):
                raise SandboxStartError(f"the sandbox zygote did not fork: {e or 'timed out'}") from None
            raise
        finally:
            theirs.close()
            os.close(out_w)
        return SandboxProcess(pid, ours, arena, out_r, exited, lambda: self._kill(pid), t0)

    def _kill(self, pid: int) -> None:
        if self._sock is not None:
            try:
                self._sock.send(json.dumps({"op": "kill", "pid": pid}).encode())
            except OSError:
                pass

    async def close(self) -> None:
        """Stop the zygote; every sandbox it forked dies with it."""
        if self._sock is not None:
            self._on_dead("was stopped")
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


class SpawnLauncher:
    """A fresh interpreter per sandbox (``python -I``, then :func:`swapserve.sandbox.child.boot`): no zygote
    to trust or keep, but every start imports torch again."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.env = sandbox_env(limits or SandboxLimits())

    async def launch(self, arena_bytes: int, keep_output: bool) -> SandboxProcess:
        t0 = time.perf_counter()
        arena, ours, theirs, out_r, out_w = _pipes(arena_bytes, keep_output)
        fds = (theirs.fileno(), arena.fd, out_w)
        try:
            proc = await asyncio.create_subprocess_exec(
                *_python("swapserve.sandbox.child", f"boot{fds}"), pass_fds=fds, env=self.env,
                stdin=subprocess.DEVNULL, cwd="/")
        except BaseException:
            arena.close()
            ours.close()
            if out_r >= 0:
                os.close(out_r)
            raise
        finally:
            theirs.close()
            os.close(out_w)
        exited: asyncio.Future[int] = asyncio.ensure_future(_status(proc))
        return SandboxProcess(proc.pid, ours, arena, out_r, exited, lambda: _kill(proc), t0)

    async def close(self) -> None:
        pass


async def _status(proc: asyncio.subprocess.Process) -> int:
    rc = await proc.wait()
    return 128 - rc if rc < 0 else rc


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass
