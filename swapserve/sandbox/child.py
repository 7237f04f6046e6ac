"""The sandbox process: isolates itself, loads ``handler.py``, then serves one request at a time.

It starts with three descriptors: its channel to the pool (a stream socket), its arena (a sealed memfd)
and its output pipe (stdout and stderr). The first message on the channel is its boot configuration.
Everything after :func:`_isolate` runs tenant code, so this process is trusted by no one: the pool checks
what it sends.

No reader thread: whichever thread waits for something — the main thread for its next request, a handler
in ``future.result()``, the event loop of an ``async def handle`` — reads the channel itself (one at a
time) and dispatches what comes, so a reply reaches the thread that waits for it without a thread
switch, and a waiter polls briefly before it sleeps, since a model's answer is often only microseconds
away. Each hop saved is a wake-up saved, which on an idle server is most of a round trip's cost.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import inspect
import collections
import itertools
import os
import select
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch

from swapserve.errors import ArtifactError, PayloadTooLargeError
from swapserve.hostcpu import usable_cores
from swapserve.sandbox import isolation as iso
from swapserve.sandbox.api import ModelCallError, ModelFuture, ModelHandle, Models, Request, Response
from swapserve.sandbox.config import ModelSignature, SandboxLimits
from swapserve.sandbox.protocol import (Arena, ProtocolViolation, check_json, decode_tensors, encode_tensors, pack,
                                        recv_blocking, send_blocking)

CHANNEL_FD, ARENA_FD = 3, 4
EXIT_LOAD_FAILED = 3
BOOT_MESSAGE_LIMIT = 1 << 20


def boot(channel_fd: int, arena_fd: int, output_fd: int) -> NoReturn:
    """Entry point after fork (zygote) or exec (spawn). Never returns."""
    code = 70
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        _settle_fds(channel_fd, arena_fd, output_fd)
        code = _Sandbox().run()
    except BaseException:  # noqa: BLE001 - last resort: say why on the output pipe, then exit
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _settle_fds(channel_fd: int, arena_fd: int, output_fd: int) -> None:
    """Channel on 3, arena on 4, output on 1 and 2, /dev/null on 0; nothing else open."""
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (channel_fd, arena_fd, output_fd)]  # out of the way
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(moved[2], 1)
    os.dup2(moved[2], 2)
    os.dup2(moved[0], CHANNEL_FD, inheritable=False)
    os.dup2(moved[1], ARENA_FD, inheritable=False)
    os.closerange(ARENA_FD + 1, iso._max_fd())
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]


class _Channel:
    """The sandbox's end of its channel, read by whichever thread waits (see the module docstring)."""

    SPIN_S = 100e-6 if usable_cores() >= 4 else 0.0
    """How long a thread waiting for a model's reply polls before it sleeps (not where the pool itself would
    lose a core to the poll: its cores counted as the node counts its own, a container's CPU quota included)."""

    def __init__(self, dispatch: Any) -> None:
        self.sock = socket.socket(fileno=CHANNEL_FD)
        self.sock.setblocking(True)
        self.dispatch = dispatch
        self.send_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.read = threading.Condition()
        """Notified after each message read, so that threads waiting behind the reader look again."""

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            send_blocking(self.sock, message)

    def wait(self, done: Any, timeout: float | None = None, spin: bool = False) -> bool:
        """Read and dispatch messages until ``done()`` (or ``timeout`` seconds)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not done():
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self.read_lock.acquire(blocking=False):
                try:
                    if not done() and self._readable(remaining, spin):
                        self._read_one()
                finally:
                    self.read_lock.release()
                    with self.read:
                        self.read.notify_all()
            else:
                with self.read:
                    if not done():
                        self.read.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def on_readable(self) -> None:
        """The event loop's reader callback (async handlers): read if no thread is reading already."""
        if self.read_lock.acquire(blocking=False):
            try:
                if self._readable(0.0, False):
                    self._read_one()
            finally:
                self.read_lock.release()
                with self.read:
                    self.read.notify_all()

    def _readable(self, timeout: float | None, spin: bool) -> bool:
        if spin:
            until = time.perf_counter() + self.SPIN_S
            while time.perf_counter() < until:
                if select.select([self.sock], [], [], 0)[0]:
                    return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def _read_one(self) -> None:
        try:
            msg = recv_blocking(self.sock, 1 << 30)
        except (OSError, ProtocolViolation):
            msg = None
        if msg is None:
            os._exit(0)  # the pool closed the channel (or is gone): nothing left to serve
        self.dispatch(msg)


class _Sandbox:
    def __init__(self) -> None:
        self.channel = _Channel(self._dispatch)
        self.sock = self.channel.sock
        self.send = self.channel.send
        self.requests: collections.deque[dict[str, Any]] = collections.deque()
        self.calls: dict[int, ModelFuture] = {}
        self.call_ids = itertools.count(1)
        self.current: int | None = None
        self.loop = asyncio.new_event_loop()

    # --- start ----------------------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.perf_counter()
        cfg = recv_blocking(self.sock, BOOT_MESSAGE_LIMIT)
        if not isinstance(cfg, dict) or cfg.get("t") != "boot":
            return 2
        self.cfg = cfg
        self.function = cfg["function"]
        try:
            directory, report = self._isolate(cfg)
        except _LoadFailure as e:
            self.send({"t": "loadfail", "stage": "isolation", "message": str(e), "detail": ""})
            return EXIT_LOAD_FAILED
        t1 = time.perf_counter()
        self.models = Models({name: ModelHandle(name, sig.inputs, sig.outputs, sig.max_batch, self)
                              for name, sig in ((n, ModelSignature.from_wire(s)) for n, s in cfg["models"].items())})
        try:
            handle, setup = self._load(directory, cfg["handler"])
            t2 = time.perf_counter()
            if setup is not None and cfg.get("run_setup", True):
                self._call_tenant(setup)
        except _LoadFailure as e:
            self.send({"t": "loadfail", "stage": e.stage, "message": str(e), "detail": e.detail})
            return EXIT_LOAD_FAILED
        t3 = time.perf_counter()
        self.handle = handle
        self.send({"t": "hello", "pid": os.getpid(), "isolation": report, "has_setup": setup is not None,
                   "is_async": inspect.iscoroutinefunction(handle),
                   "timings": {"isolate": (t1 - t0) * 1e3, "import": (t2 - t1) * 1e3, "setup": (t3 - t2) * 1e3}})
        return self._serve()

    def _isolate(self, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        mode = cfg["isolation"]
        limits = SandboxLimits(**cfg["limits"])
        deny = [str(p) for p in cfg["deny_paths"]]
        directory = cfg["directory"]
        report: dict[str, Any] = {"mode": mode, "landlock_abi": 0, "namespaces": [], "problems": [],
                                  "nice": limits.nice, "caps_dropped": False}
        problems: list[str] = report["problems"]
        os.setsid()
        iso.die_with_parent()
        if mode != "off":
            ns = iso.unshare_namespaces()
            report["namespaces"] = ns
            if "pid" in ns:
                iso.become_init()
            if "uts" in ns:
                iso.set_hostname("sandbox")
            if "mount" in ns:
                try:
                    directory, more = iso.setup_mounts(directory, deny, limits.tmp_bytes, "pid" in ns)
                    problems += more
                except OSError as e:
                    problems.append(f"mounts incomplete: {e}")
        self.arena = Arena(ARENA_FD, cfg["arena_bytes"])
        self.theirs, self.mine = (0, self.arena.half), self.arena.child_side()
        os.environ.clear()
        os.environ.update(cfg["env"])
        torch.set_num_threads(limits.threads)
        report["rlimits"] = iso.set_limits(limits, "user" in report["namespaces"])
        if mode != "off":
            abi = iso.landlock_abi()
            if abi:
                read, dropped = iso.drop_covering(iso.runtime_read_paths(), deny)
                problems += [f"{p} is not readable: it holds a denied path" for p in dropped]
                private_tmp = "mount" in report["namespaces"] and limits.tmp_bytes > 0
                iso.apply_landlock(abi, [*read, directory, "/proc/self"], ["/tmp"] if private_tmp else [],
                                   iso.DEV_FILES)
                report["landlock_abi"] = abi
            elif mode == "strict":
                raise _LoadFailure("isolation", "isolation='strict' needs Landlock (Linux >= 5.13 with Landlock "
                                                "enabled); this kernel has none")
            report["caps_dropped"] = iso.drop_capabilities()
        iso.no_new_privs()
        os.chdir(directory)
        report["directory"] = directory
        return directory, report

    def _load(self, directory: str, handler: str) -> tuple[Any, Any]:
        sys.dont_write_bytecode = True
        sys.path.insert(0, directory)
        path = os.path.join(directory, handler)
        name = Path(handler).stem
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise _LoadFailure("import", f"{handler} is not a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except _LoadFailure:
            raise
        except SyntaxError as e:
            raise _LoadFailure("import", f"{handler} line {e.lineno}: SyntaxError: {e.msg}",
                               _tenant_traceback(e)) from None
        except BaseException as e:  # noqa: BLE001 - tenant code: anything can happen, SystemExit included
            raise _LoadFailure("import", f"importing {handler} failed: {_describe(e)}", _tenant_traceback(e)) from None
        handle = getattr(module, "handle", None)
        if handle is None or not callable(handle):
            raise _LoadFailure("handle", f"{handler} defines no handle(request, models) function")
        try:
            inspect.signature(handle).bind(None, None)
        except TypeError:
            raise _LoadFailure("handle", f"{handler}: handle{inspect.signature(handle)} must accept two arguments, "
                                         "(request, models)") from None
        except ValueError:  # no signature (a builtin): let it be
            pass
        setup = getattr(module, "setup", None)
        if setup is not None and not callable(setup):
            raise _LoadFailure("setup", f"{handler}: setup is not a function")
        return handle, setup

    def _call_tenant(self, setup: Any) -> None:
        try:
            result = setup()
            if inspect.isawaitable(result):
                self.loop.run_until_complete(result)
        except BaseException as e:  # noqa: BLE001
            raise _LoadFailure("setup", f"setup() failed: {_describe(e)}", _tenant_traceback(e)) from None

    # --- requests -------------------------------------------------------------------------------

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("t") == "req":
            self.requests.append(msg)
        elif msg.get("t") == "ret":
            self._complete_call(msg)

    def _complete_call(self, msg: dict[str, Any]) -> None:
        fut = self.calls.pop(msg["id"], None)
        if fut is None:
            return
        if "error" in msg:
            exc: BaseException = ModelCallError(f"model {fut.model!r}: {msg['error']}", msg.get("status", 500), fut.call_id)
            fut._future.set_exception(exc)
            return
        try:
            # Views of the pool's half of the arena, which it writes from afresh only at the next request:
            # valid until handle() returns (each call's outputs in a region of their own). No 1 MiB copy per call.
            outputs = self.arena.read(decode_tensors(msg["tensors"], *self.theirs), copy=False)
        except BaseException as e:  # noqa: BLE001 - malformed references
            fut._future.set_exception(ModelCallError(f"model {fut.model!r}: could not receive outputs: {_describe(e)}"))
            return
        fut._future.set_result(outputs)

    def submit(self, model: str, inputs: dict[str, torch.Tensor]) -> ModelFuture:
        """ModelHandle's transport: inputs into the arena, the call to the pool, a future back."""
        with self.channel.send_lock:
            rid = self.current
            if rid is None:
                raise ModelCallError("model handles can be called only while handle() runs (not in setup(), "
                                     "nor from a thread that outlives its request)")
            try:
                refs = self.mine.place(inputs, f"inputs of model {model!r}")
            except PayloadTooLargeError as e:
                raise ModelCallError(str(e), 413) from None
            fut = ModelFuture(model, next(self.call_ids), self._wait_reply)
            self.calls[fut.call_id] = fut
            send_blocking(self.sock, {"t": "call", "req": rid, "id": fut.call_id, "model": model,
                                      "inputs": encode_tensors(refs)})
        return fut

    def _wait_reply(self, done: Any, timeout: float | None) -> bool:
        return self.channel.wait(done, timeout, spin=True)

    def _serve(self) -> int:
        self.loop.add_reader(CHANNEL_FD, self.channel.on_readable)  # replies for awaiting async handlers
        while True:
            self.channel.wait(lambda: bool(self.requests))
            self.send(self._respond(self.requests.popleft()))

    def _respond(self, msg: dict[str, Any]) -> dict[str, Any]:
        rid = msg["id"]
        try:
            self.mine.reset()
            is_json = bool(msg["is_json"])
            inputs = {} if is_json else self.arena.read(decode_tensors(msg["tensors"], *self.theirs), copy=False)
            request = Request(inputs, msg.get("params") or {}, msg.get("json"), is_json,
                              time.monotonic() + float(msg["timeout_s"]))
        except BaseException as e:  # noqa: BLE001
            return _fail(rid, "memory" if _is_oom(e) else "handler", f"could not receive the request: {_describe(e)}")
        with self.channel.send_lock:
            self.current = rid
        try:
            result = self.handle(request, self.models)
            if inspect.isawaitable(result):
                result = self.loop.run_until_complete(result)
            return self._encode(rid, result, is_json)
        except ModelCallError as e:
            return _fail(rid, "handler", _describe(e) + _where(e), _tenant_traceback(e), e.call_id)
        except BaseException as e:  # noqa: BLE001 - tenant code
            if _is_oom(e):
                return _fail(rid, "memory", _describe(e), _tenant_traceback(e))
            return _fail(rid, "handler", _describe(e) + _where(e), _tenant_traceback(e))
        finally:
            with self.channel.send_lock:
                self.current = None
                self.calls.clear()  # unfinished calls are abandoned; the pool cancels them

    def _encode(self, rid: int, result: Any, is_json: bool) -> dict[str, Any]:
        if is_json:
            if isinstance(result, (torch.Tensor, Response)):
                return _fail(rid, "output", f"handle() returned {type(result).__name__} on the JSON route; "
                                            "return a JSON value (dict, list, str, number, bool or None)")
            try:
                check_json(result)
            except ProtocolViolation as e:
                return _fail(rid, "output", f"handle() returned something that is not JSON: {e}")
            reply = {"t": "resp", "req": rid, "is_json": True, "json": result, "params": {}}
        else:
            if isinstance(result, Response):
                tensors, params = result.tensors, result.parameters
            else:
                tensors, params = result, {}
            if not isinstance(tensors, dict) or not tensors or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
                return _fail(rid, "output", f"handle() returned {_type_name(result)}; return a non-empty "
                                            "dict[str, torch.Tensor] or swapserve.sandbox.Response")
            try:
                check_json(params)
                if not isinstance(params, dict):
                    raise ProtocolViolation("parameters must be a dict")
            except ProtocolViolation as e:
                return _fail(rid, "output", f"the response's parameters are not a JSON object: {e}")
            try:
                refs = self.mine.place({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                       "the response's tensors")
            except (ArtifactError, PayloadTooLargeError) as e:
                return _fail(rid, "output", f"the response's tensors cannot be sent: {e}")
            reply = {"t": "resp", "req": rid, "is_json": False, "tensors": encode_tensors(refs), "params": params}
        size = len(pack(reply))
        if size > self.cfg["max_message_bytes"]:
            return _fail(rid, "output", f"the response's JSON/parameters take {size} bytes, more than the limit of "
                                        f"{self.cfg['max_message_bytes']}")
        return reply


class _LoadFailure(Exception):
    def __init__(self, stage: str, message: str, detail: str = ""):
        super().__init__(message)
        self.stage = stage
        self.detail = detail


def _fail(rid: int, kind: str, message: str, detail: str = "", call: int | None = None) -> dict[str, Any]:
    return {"t": "fail", "req": rid, "kind": kind, "message": message, "detail": detail, "call": call}


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _type_name(v: Any) -> str:
    if isinstance(v, dict):
        bad = next((x for x in v.values() if not isinstance(x, torch.Tensor)), None)
        return f"a dict with a {type(bad).__name__} value" if bad is not None else "an empty dict"
    return type(v).__name__


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                            or "out of memory" in text)


def _tenant_frames(e: BaseException) -> list[traceback.FrameSummary]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(here)]


def _where(e: BaseException) -> str:
    frames = _tenant_frames(e)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"


def _tenant_traceback(e: BaseException) -> str:
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(_tenant_frames(e)),
             *traceback.format_exception_only(type(e), e)]
    return "".join(lines)

