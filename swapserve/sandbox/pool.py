"""A function's handler sandboxes: started on demand, kept warm by recent load, scaled to zero when idle.

One sandbox serves one request at a time; a pool holds up to ``max_sandboxes`` of them, so requests beyond
that wait (``max_queue``, then 429). A request runs in a sandbox; each model call the handler makes comes
back here as a message naming tensors in the sandbox's arena, goes to the controller through the
``call_model`` callback with the request's deadline, and its outputs go back through the arena.

Failure stays with its request: a handler that raises, returns garbage, runs out of memory, crashes, hangs
past the timeout or breaks the protocol fails that request with a clear error; the sandbox is killed where
its state is suspect and a replacement started if the warm target wants one. Other functions' pools share
nothing with this one but the zygote.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import enum
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swapserve.artifact.manifest import dtype_name
from swapserve.errors import ArtifactError, InvalidInputError, OverloadedError, SwapserveError, UnavailableError
from swapserve.sandbox.api import ModelHandle, ModelInputError
from swapserve.sandbox.config import ModelSignature, SandboxConfig
from swapserve.sandbox.errors import (HandlerError, HandlerLoadError, HandlerOutputError, HandlerTimeoutError,
                                      SandboxCrashedError, SandboxMemoryError, SandboxProtocolError, SandboxStartError)
from swapserve.sandbox.isolation import describe
from swapserve.sandbox.launcher import Launcher, SandboxProcess, sandbox_env
from swapserve.sandbox.protocol import (HEADER, Bump, Call, Failure, Hello, LoadFailed, ProtocolViolation,
                                        Response, check_json, encode_tensors, pack, parse_child_message, unpack)
from swapserve.sandbox.types import CallModel, ColdStart, HandlerResult, PoolStats, SandboxEvent

log = logging.getLogger(__name__)
handler_log = logging.getLogger("swapserve.sandbox.handler")

MAX_CALLS_PER_REQUEST = 256
MAX_PENDING_WRITE = 16 << 20
LOAD_FAILURE_BACKOFF_S = 2.0
_isolation_logged: set[str] = set()


class SandboxState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


@dataclass(eq=False)
class _Active:
    id: int
    future: asyncio.Future[HandlerResult]
    deadline: float
    calls: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    errors: dict[int, SwapserveError] = field(default_factory=dict)
    done_calls: int = 0


@dataclass(eq=False)
class _Sandbox:
    proc: SandboxProcess
    writer: asyncio.StreamWriter
    ready: asyncio.Future[Hello]
    state: SandboxState = SandboxState.IDLE
    last_used: float = 0.0
    cold: ColdStart | None = None
    fresh: bool = True
    """Not yet used by a request (its cold start is still to be reported)."""
    active: _Active | None = None
    killed: str = ""
    """Why we killed it, if we did."""
    replace: bool = False
    dead: bool = False
    """Its channel closed."""

    def __post_init__(self) -> None:
        self.down = self.proc.arena.parent_side()


class _ArenaSink:
    """A model call's outputs straight into the parent's half of the sandbox's arena (an OutputSink)."""

    def __init__(self, down: Bump):
        self.down = down

    def place(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        return self.down.alloc(like)

    def discard(self) -> None:
        pass  # the half starts over at the next request


class SandboxPool:
    """Handler sandboxes of one function version.

    ``call_model(function, model, inputs, deadline, sink)`` is the controller's: schedule one call of ``model``
    (a key of ``models``) for ``function`` and return its outputs by name — written, where it can, into the
    memory ``sink.place(name, like)`` gives (the sandbox's shared memory: they are then passed to the sandbox
    where they lie, not copied again; a :class:`swapserve.node.dispatch.OutputSink`). ``inputs`` are checked against
    the model's signature, in declared order; they are views of the sandbox's shared memory, valid until
    the call returns — copy them (the controller does, into the worker's slab) and keep no reference.
    ``deadline`` is the request's, on ``clock``: the SLO covers the whole handler run. Raise a
    :class:`SwapserveError` to fail the call; the handler sees it, and if it lets it through the request
    fails with that very error (e.g. 503 + Retry-After). If the request ends first (timeout, handler done)
    the call is cancelled.
    """

    def __init__(self, function: str, directory: str | Path, handler: str, models: Mapping[str, ModelSignature],
                 call_model: CallModel, launcher: Launcher, config: SandboxConfig | None = None, *,
                 run_setup: bool = True, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[SandboxEvent], None] | None = None):
        self.function = function
        self.directory = Path(directory).resolve()
        self.handler = handler
        self.models = dict(models)
        self.call_model = call_model
        self.launcher = launcher
        self.config = config or SandboxConfig()
        self.run_setup = run_setup
        self.clock = clock
        self.on_event = on_event
        self._sandboxes: list[_Sandbox] = []
        self._starting = 0
        self._waiters: collections.deque[asyncio.Future[_Sandbox]] = collections.deque()
        self._load: collections.deque[tuple[float, int]] = collections.deque()
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._broken: tuple[SwapserveError, float] | None = None
        self._closed = False
        self._counts = collections.Counter[str]()
        self._cold_starts: collections.deque[ColdStart] = collections.deque(maxlen=32)
        self._isolation: dict[str, Any] = {}
        self.hello: Hello | None = None
        """The last started sandbox's hello (what it found in handler.py, how it is isolated)."""
        self._handles = {n: ModelHandle(n, s.inputs, s.outputs, s.max_batch, None) for n, s in self.models.items()}  # type: ignore[arg-type]

    # --- public -------------------------------------------------------------------------------

    async def infer(self, inputs: Mapping[str, torch.Tensor], parameters: Mapping[str, Any] | None = None, *,
                    deadline: float | None = None) -> HandlerResult:
        """Run the handler on a tensor request. ``deadline`` (on ``clock``) is what model calls are
        scheduled against; by default arrival + ``timeout_s``."""
        if not isinstance(inputs, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in inputs.items()):
            raise InvalidInputError("a handler request's inputs must map names to tensors")
        for k, v in inputs.items():
            try:
                dtype_name(v.dtype)
            except ArtifactError:
                raise InvalidInputError(f"input {k!r} has unsupported dtype {v.dtype}") from None
        return await self._run(False, {k: v.detach().cpu().contiguous() for k, v in inputs.items()}, None,
                               _params(parameters), deadline)

    async def infer_json(self, value: Any, parameters: Mapping[str, Any] | None = None, *,
                         deadline: float | None = None) -> HandlerResult:
        """Run the handler on the JSON route: ``value`` is any JSON value; the result's ``json`` is the
        handler's."""
        try:
            check_json(value)
        except ProtocolViolation as e:
            raise InvalidInputError(f"the request body is not JSON: {e}") from None
        return await self._run(True, {}, value, _params(parameters), deadline)

    def prewarm(self, n: int = 1) -> None:
        """Start sandboxes in the background until ``n`` (at most ``max_sandboxes``) are up or starting, and
        count them as recent load so they are kept for an idle period. Returns at once: call it (from the
        event loop) when a request for the function is on its way, e.g. while its model swaps in."""
        if self._closed:
            return
        n = min(n, self.config.max_sandboxes)
        self._load.append((self.clock(), n))
        self._replenish(n)

    async def warm_up(self, n: int = 1) -> None:
        """Like :meth:`prewarm`, and wait until ``n`` sandboxes are ready (raises if one fails to start)."""
        n = min(n, self.config.max_sandboxes)
        self._load.append((self.clock(), n))
        need = n - len(self._sandboxes) - self._starting
        if need > 0:
            results = await asyncio.gather(*(self._start_one() for _ in range(need)), return_exceptions=True)
            for r in results:
                if isinstance(r, _Sandbox):
                    self._offer(r)
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    def stats(self) -> PoolStats:
        states = collections.Counter(s.state for s in self._sandboxes)
        return PoolStats(self.function, self._starting, states[SandboxState.IDLE], states[SandboxState.BUSY],
                         sum(1 for w in self._waiters if not w.done()), self._warm_target(self.clock()),
                         self._counts["started"], self._counts["replaced"], self._counts["stopped_idle"],
                         self._counts["requests"], self._counts["failed"], tuple(self._cold_starts),
                         dict(self._isolation))

    async def close(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let running ones finish (up to ``grace_s``), then stop every sandbox."""
        self._closed = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(UnavailableError(f"function {self.function!r} is being unloaded"))
        end = time.monotonic() + grace_s
        while any(s.active for s in self._sandboxes) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        stopped = list(self._sandboxes)
        for s in stopped:
            self._stop(s, "pool closed")
        if self._reaper is not None:
            self._reaper.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *([self._reaper] if self._reaper else []), return_exceptions=True)
        for s in stopped:
            s.proc.arena.close()

    # --- a request ----------------------------------------------------------------------------

    async def _run(self, is_json: bool, inputs: dict[str, torch.Tensor], value: Any, params: dict[str, Any],
                   deadline: float | None) -> HandlerResult:
        if self._closed:
            raise UnavailableError(f"function {self.function!r} is being unloaded")
        arrival = self.clock()
        if self._broken is not None:
            err, until = self._broken
            if arrival < until:
                raise copy.copy(err)
            self._broken = None
        expires = arrival + self.config.timeout_s
        deadline = expires if deadline is None else deadline
        self._in_flight += 1
        self._load.append((arrival, self._in_flight))
        self._counts["requests"] += 1
        try:
            sb = await self._acquire(expires)
            wait_ms = (self.clock() - arrival) * 1e3
            cold_ms = sb.cold.total_ms if sb.fresh and sb.cold and wait_ms >= sb.cold.total_ms * 0.5 else 0.0
            sb.fresh = False
            result = await self._serve(sb, is_json, inputs, value, params, expires, deadline)
            return HandlerResult(result.outputs, result.parameters, result.json, wait_ms, result.handler_ms, cold_ms,
                                 result.model_calls)
        except SwapserveError:
            self._counts["failed"] += 1
            raise
        finally:
            self._in_flight -= 1

    async def _acquire(self, expires: float) -> _Sandbox:
        idle = [s for s in self._sandboxes if s.state is SandboxState.IDLE]
        if idle and not self._waiters:
            sb = max(idle, key=lambda s: s.last_used)  # most recent first: the others may idle out
            sb.state = SandboxState.BUSY
            return sb
        if len(self._waiters) >= self.config.max_queue:
            raise OverloadedError(f"function {self.function!r}: {len(self._waiters)} requests already wait for "
                                  "a handler sandbox", retry_after=1.0, http_status=429)
        fut: asyncio.Future[_Sandbox] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._replenish()
        try:
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, expires - self.clock()))
        except asyncio.CancelledError:
            self._give_back(fut)
            raise
        if not done:
            self._give_back(fut)
            raise HandlerTimeoutError(f"function {self.function!r}: no handler sandbox became free within "
                                      f"{self.config.timeout_s:g} s ({len(self._sandboxes)} busy, "
                                      f"{self._starting} starting)")
        return fut.result()

    def _give_back(self, fut: asyncio.Future[_Sandbox]) -> None:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._offer(fut.result())
        else:
            fut.cancel()
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    async def _serve(self, sb: _Sandbox, is_json: bool, inputs: dict[str, torch.Tensor], value: Any,
                     params: dict[str, Any], expires: float, deadline: float) -> HandlerResult:
        loop = asyncio.get_running_loop()
        active = _Active(next(self._ids), loop.create_future(), deadline)
        msg: dict[str, Any] = {"t": "req", "id": active.id, "is_json": is_json, "params": params,
                               "timeout_s": max(0.0, expires - self.clock())}
        sb.down.reset()
        try:
            if is_json:
                msg["json"] = value
            else:
                msg["tensors"] = encode_tensors(sb.down.write(inputs, "the request's tensors"))
        except SwapserveError:
            self._offer(sb)
            raise
        sb.active = active
        t0 = self.clock()
        if sb.dead:
            active.future.set_exception(SandboxCrashedError(f"the handler's sandbox for {self.function!r} died just "
                                                            "before the request reached it"))
        self._send(sb, msg)
        try:
            done, _ = await asyncio.wait({active.future}, timeout=max(0.0, expires - self.clock()))
            if not done:
                active.future.cancel()
                self._kill(sb, "timed out")
                raise HandlerTimeoutError(f"the handler of {self.function!r} did not answer within "
                                          f"{self.config.timeout_s:g} s; its sandbox was killed")
            result = active.future.result()
        finally:
            await self._end(sb, active)
        handler_ms = (self.clock() - t0) * 1e3
        self._event("request", handler_ms / 1e3)
        return HandlerResult(result.outputs, result.parameters, result.json, handler_ms=handler_ms,
                             model_calls=active.done_calls)

    async def _end(self, sb: _Sandbox, active: _Active) -> None:
        """The request is over: abandon its model calls, then free or replace its sandbox."""
        unfinished = [t for t in active.calls.values() if not t.done()]
        for t in unfinished:
            t.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)
        sb.active = None
        if not active.future.done() or active.future.cancelled():
            sb.killed = sb.killed or "its request was cancelled"  # the handler is still running: never reuse it
        if sb.dead:
            sb.proc.arena.close()
        if sb.killed or sb.replace or sb.dead:
            self._kill(sb, sb.killed or ("replaced after a failure" if sb.replace else "died"))
            self._counts["replaced"] += 1
            self._event("replaced", reason=sb.killed or "failure")
            self._replenish()
        else:
            self._offer(sb)

    # --- messages from a sandbox --------------------------------------------------------------

    async def _read(self, sb: _Sandbox, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if n > self.config.max_message_bytes:
                    raise ProtocolViolation(f"a message of {n} bytes exceeds max_message_bytes")
                body = await reader.readexactly(n)
                try:
                    raw = unpack(body)
                except ProtocolViolation:
                    raise
                except Exception as e:  # noqa: BLE001 - malformed msgpack of any kind
                    raise ProtocolViolation(f"undecodable message: {type(e).__name__}: {e}") from None
                # Anywhere in its arena: the sandbox names the pool's own writes (inputs, outputs) as they are.
                self._on_message(sb, parse_child_message(raw, 0, sb.proc.arena.nbytes))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolViolation as e:
            log.warning("sandbox of %s broke the protocol (%s); killing it", self.function, e)
            self._fail_active(sb, SandboxProtocolError(f"the handler's sandbox for {self.function!r} sent an invalid "
                                                       f"message ({e}); it was killed"))
            self._kill(sb, "protocol violation")
        await self._on_exit(sb)

    def _on_message(self, sb: _Sandbox, msg: Any) -> None:
        if isinstance(msg, Hello) or isinstance(msg, LoadFailed):
            if sb.ready.done():
                raise ProtocolViolation("a second hello")
            if isinstance(msg, Hello):
                sb.ready.set_result(msg)
            elif msg.stage == "isolation":
                sb.ready.set_exception(SandboxStartError(f"sandbox for {self.function!r}: {msg.message}"))
            else:
                sb.ready.set_exception(HandlerLoadError(f"the handler of {self.function!r} failed to load: {msg.message}",
                                                        msg.detail))
            return
        active = sb.active
        if active is None or msg.request != active.id:
            raise ProtocolViolation(f"{type(msg).__name__} for a request that is not running")
        if isinstance(msg, Call):
            self._on_call(sb, active, msg)
            return
        if active.future.done():
            raise ProtocolViolation("a second answer to one request")
        if isinstance(msg, Response):
            outputs = sb.proc.arena.read(msg.tensors)
            active.future.set_result(HandlerResult(outputs, msg.parameters, msg.json))
        elif isinstance(msg, Failure):
            active.future.set_exception(self._failure(sb, active, msg))

    def _failure(self, sb: _Sandbox, active: _Active, f: Failure) -> SwapserveError:
        if f.kind == "memory":
            sb.replace = True
            mib = self.config.limits.memory_bytes >> 20
            return SandboxMemoryError(f"the handler of {self.function!r} exceeded its sandbox memory limit "
                                      f"({mib} MiB): {f.message}")
        if f.kind == "output":
            return HandlerOutputError(f"the handler of {self.function!r} returned an invalid response: {f.message}")
        if f.call is not None and f.call in active.errors:
            return active.errors[f.call]  # the model call's own error, status and Retry-After included
        sb.replace = self.config.replace_on_error
        return HandlerError(f"the handler of {self.function!r} raised {f.message}", f.detail)

    def _on_call(self, sb: _Sandbox, active: _Active, msg: Call) -> None:
        if msg.id in active.calls or msg.id in active.errors:
            raise ProtocolViolation(f"model call id {msg.id} reused")
        handle = self._handles.get(msg.model)
        error: SwapserveError | None = None
        if handle is None:
            error = InvalidInputError(f"no model {msg.model!r}; this function has {sorted(self._handles)}")
        elif len(active.calls) >= MAX_CALLS_PER_REQUEST:
            error = OverloadedError(f"more than {MAX_CALLS_PER_REQUEST} model calls in one request", 1.0, 429)
        else:
            try:
                inputs = handle.check(sb.proc.arena.read(msg.inputs, copy=False))
            except ModelInputError as e:
                error = InvalidInputError(str(e))
        if error is not None:
            active.errors[msg.id] = error
            self._send(sb, {"t": "ret", "id": msg.id, "error": str(error), "status": error.http_status})
            return
        task = asyncio.get_running_loop().create_task(self._call(sb, active, msg.id, msg.model, inputs))
        active.calls[msg.id] = task

    async def _call(self, sb: _Sandbox, active: _Active, cid: int, model: str, inputs: dict[str, torch.Tensor]) -> None:
        try:
            outputs = await self.call_model(self.function, model, inputs, active.deadline, _ArenaSink(sb.down))
            if not isinstance(outputs, Mapping) or not all(isinstance(v, torch.Tensor) for v in outputs.values()):
                raise SwapserveError(f"call_model returned {type(outputs).__name__}, not a dict of tensors")
            if sb.dead or sb.writer.is_closing():
                return
            refs = sb.down.place(dict(outputs), f"outputs of model {model!r}")
            active.done_calls += 1
            self._send(sb, {"t": "ret", "id": cid, "tensors": encode_tensors(refs)})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - anything the controller raises fails this call only
            if not isinstance(e, SwapserveError):
                log.exception("model call %s/%s failed", self.function, model)
                e = SwapserveError(f"model call failed: {type(e).__name__}: {e}")
            active.errors[cid] = e
            self._send(sb, {"t": "ret", "id": cid, "error": str(e), "status": e.http_status})

    def _fail_active(self, sb: _Sandbox, error: SwapserveError) -> None:
        if sb.active is not None and not sb.active.future.done():
            sb.active.future.set_exception(error)
        if not sb.ready.done():
            sb.ready.set_exception(error)

    async def _on_exit(self, sb: _Sandbox) -> None:
        """The channel closed: the sandbox is gone (or going). Say why to whoever waited on it."""
        sb.dead = True
        idle_died = sb in self._sandboxes and sb.state is SandboxState.IDLE
        if idle_died:
            self._sandboxes.remove(sb)  # at once, before anyone picks it
        try:
            code = await asyncio.wait_for(asyncio.shield(sb.proc.exited), 2.0)
        except asyncio.TimeoutError:
            sb.proc.kill()
            code = -1
        reason = sb.killed or _exit_reason(code, self.config)
        if sb.active is not None and not sb.active.future.done():
            sb.killed = sb.killed or reason
            self._fail_active(sb, SandboxCrashedError(f"the handler's sandbox for {self.function!r} died while "
                                                      f"serving the request: {reason}"))
        elif not sb.ready.done():
            self._fail_active(sb, SandboxStartError(f"the sandbox for {self.function!r} died while starting: {reason}"))
        elif idle_died and not sb.killed:
            log.warning("an idle sandbox of %s died: %s", self.function, reason)
            self._replenish()
        sb.writer.close()
        if sb.active is None:
            sb.proc.arena.close()

    # --- sandbox lifecycle --------------------------------------------------------------------

    async def _start_one(self) -> _Sandbox:
        self._starting += 1
        try:
            return await self._start()
        finally:
            self._starting -= 1

    async def _start(self) -> _Sandbox:
        cfg = self.config
        self._event("starting")
        proc = await self.launcher.launch(cfg.slab_bytes, cfg.handler_output == "log")
        forked = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=proc.channel)
        except BaseException:
            proc.kill()
            proc.arena.close()
            raise
        sb = _Sandbox(proc, writer, loop.create_future())
        sb.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: failures are reported by _start
        self._spawn_task(self._read(sb, reader))
        if proc.output >= 0:
            self._spawn_task(self._forward_output(proc.output))
        self._send(sb, {"t": "boot", "function": self.function, "directory": str(self.directory),
                        "handler": self.handler, "models": {n: s.to_wire() for n, s in self.models.items()},
                        "limits": asdict(cfg.limits), "isolation": cfg.isolation,
                        "deny_paths": [str(p) for p in cfg.deny_paths], "env": sandbox_env(cfg.limits, dict(cfg.env)),
                        "arena_bytes": proc.arena.nbytes, "max_message_bytes": cfg.max_message_bytes,
                        "run_setup": self.run_setup})
        try:
            hello = await asyncio.wait_for(asyncio.shield(sb.ready), cfg.start_timeout_s)
        except BaseException as e:
            self._kill(sb, "did not start")
            if isinstance(e, asyncio.TimeoutError):
                e = SandboxStartError(f"the sandbox for {self.function!r} did not start within {cfg.start_timeout_s:g} s")
            if isinstance(e, HandlerLoadError):
                self._broken = (e, self.clock() + LOAD_FAILURE_BACKOFF_S)
            self._event("start_failed", reason=str(e))
            raise e from None
        done = time.perf_counter()
        t = hello.timings
        sb.cold = ColdStart((done - proc.started) * 1e3, (forked - proc.started) * 1e3, t.get("isolate", 0.0),
                            t.get("import", 0.0), t.get("setup", 0.0))
        self._cold_starts.append(sb.cold)
        self._isolation = hello.isolation
        self.hello = hello
        self._counts["started"] += 1
        self._event("started", sb.cold.total_ms / 1e3)
        _log_isolation(hello.isolation)
        if self._closed:
            self._kill(sb, "pool closed")
            raise UnavailableError(f"function {self.function!r} is being unloaded")
        sb.last_used = self.clock()
        self._sandboxes.append(sb)
        return sb

    def _replenish(self, floor: int = 0) -> None:
        """Start sandboxes in the background up to what waiting requests and the warm target need."""
        if self._closed:
            return
        busy = sum(1 for s in self._sandboxes if s.state is SandboxState.BUSY)
        waiting = sum(1 for w in self._waiters if not w.done())
        want = min(self.config.max_sandboxes, max(floor, self._warm_target(self.clock()), busy + waiting))
        while len(self._sandboxes) + self._starting < want:
            self._spawn_task(self._start_and_offer())
            self._starting += 1  # counted now, so this loop and later callers see it

    async def _start_and_offer(self) -> None:
        try:
            sb = await self._start()
        except SwapserveError as e:
            while self._waiters:  # a start failure is almost never one-off: fail the waiters rather than spin
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001
            log.exception("starting a sandbox for %s failed", self.function)
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(SandboxStartError(f"starting a sandbox for {self.function!r} failed: {e}"))
            return
        finally:
            self._starting -= 1
        self._offer(sb)

    def _offer(self, sb: _Sandbox) -> None:
        """A sandbox is free: to the first waiter, else idle."""
        if sb not in self._sandboxes:
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                sb.state = SandboxState.BUSY
                w.set_result(sb)
                return
        sb.state = SandboxState.IDLE
        sb.last_used = self.clock()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _warm_target(self, now: float) -> int:
        """Peak requests in flight over the load window, within [min_sandboxes, max_sandboxes]."""
        while self._load and now - self._load[0][0] > self.config.load_window_s:
            self._load.popleft()
        peak = max((c for _, c in self._load), default=0)
        return min(self.config.max_sandboxes, max(self.config.min_sandboxes, peak))

    async def _reap(self) -> None:
        """Stop sandboxes idle for ``idle_s`` beyond the warm target (down to zero)."""
        tick = max(0.01, min(1.0, self.config.idle_s / 4, self.config.load_window_s / 4))
        while self._sandboxes and not self._closed:
            await asyncio.sleep(tick)
            now = self.clock()
            excess = len(self._sandboxes) - self._warm_target(now)
            for sb in sorted((s for s in self._sandboxes if s.state is SandboxState.IDLE), key=lambda s: s.last_used):
                if excess <= 0:
                    break
                if now - sb.last_used >= self.config.idle_s:
                    self._stop(sb, "idle")
                    self._counts["stopped_idle"] += 1
                    excess -= 1

    def _stop(self, sb: _Sandbox, reason: str) -> None:
        self._kill(sb, reason)
        self._event("stopped", reason=reason)

    def _kill(self, sb: _Sandbox, reason: str) -> None:
        sb.killed = sb.killed or reason
        sb.state = SandboxState.STOPPING
        if sb in self._sandboxes:
            self._sandboxes.remove(sb)
        sb.proc.kill()
        sb.writer.close()

    def _send(self, sb: _Sandbox, msg: dict[str, Any]) -> None:
        if sb.writer.is_closing():
            return
        sb.writer.write(pack(msg))
        if sb.writer.transport.get_write_buffer_size() > MAX_PENDING_WRITE:
            self._fail_active(sb, SandboxProtocolError(f"the handler's sandbox for {self.function!r} stopped reading "
                                                       "its channel; it was killed"))
            self._kill(sb, "not reading its channel")

    async def _forward_output(self, fd: int) -> None:
        """Handler stdout/stderr, line by line, to the ``swapserve.sandbox.handler`` logger."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        pending = b""
        try:
            while chunk := await reader.read(1 << 16):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()[-4096:]
                for line in lines:
                    handler_log.info("[%s] %s", self.function, line[:4096].decode("utf-8", "replace"))
        finally:
            transport.close()

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # no loop running: a caller's bug, said loudly
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, kind: Any, seconds: float = 0.0, reason: str = "") -> None:
        if self.on_event is not None:
            try:
                self.on_event(SandboxEvent(self.function, kind, seconds, reason))
            except Exception:  # noqa: BLE001 - metrics must not break requests
                log.exception("sandbox event hook failed")


def _params(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    params = dict(parameters or {})
    try:
        check_json(params)
    except ProtocolViolation as e:
        raise InvalidInputError(f"request parameters are not JSON: {e}") from None
    return params


def _exit_reason(code: int, config: SandboxConfig) -> str:
    lim = config.limits
    if code < 0:
        return "its process vanished (the sandbox zygote died)"
    if code < 128:
        return f"it exited with code {code}"
    try:
        name = signal.Signals(code - 128).name
    except ValueError:
        name = f"signal {code - 128}"
    if name == "SIGXCPU" or name == "SIGKILL":
        return (f"it was killed ({name}): it used up its CPU-time limit ({lim.cpu_seconds} s) or the system ran out "
                "of memory")
    if name in ("SIGSEGV", "SIGBUS", "SIGABRT"):
        return (f"it crashed ({name}); a handler that exceeds its memory limit ({lim.memory_bytes >> 20} MiB) in "
                "native code can crash this way")
    return f"it was killed by {name}"


def _log_isolation(report: dict[str, Any]) -> None:
    """Once per process and distinct configuration: one line on what sandboxes are isolated by."""
    line = describe(report)
    if line in _isolation_logged:
        return
    _isolation_logged.add(line)
    degraded = "missing" in line or report.get("mode") == "off"
    log.log(logging.WARNING if degraded else logging.INFO, "%s", line)
