"""The controller's side of the HTTP fronts: it starts ``count`` front processes, answers their ``NodeAPI`` calls
on the node, pushes them the catalog, gathers their metrics, and replaces a front that dies.

With fronts, the controller itself serves no HTTP: it binds the node's address and hands the listening socket to
every front, which accept connections from it, run the whole gateway (HTTP parsing, OIP decoding and encoding,
tokens, uploads) and send the controller one frame per call (:mod:`swapserve.fronts.peer`); large outputs come
back through shared memory (:mod:`swapserve.fronts.arena`). The controller keeps admission, scheduling, dispatch
and the only metrics registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swapserve.errors import NotFoundError, SwapserveError
from swapserve.fronts.arena import Arena, open_arena
from swapserve.fronts.peer import Answer, Peer, Placed, Tensors
from swapserve.fronts.remote import info_to_wire, result_to_wire
from swapserve.gateway.config import GatewayConfig
from swapserve.metrics import Metrics
from swapserve.node.api import FunctionInfo, NodeAPI
from swapserve.node.dispatch import OFF_LOOP_COPY_BYTES, copy_all

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""A front's start (imports, connecting, binding the port)."""
FLUSH_TIMEOUT_S = 1.0
"""How long a scrape waits for each front's pending observations."""
LISTEN_BACKLOG = 1024
RESTART_AFTER_S = 5.0
"""A front that dies is replaced, unless it lived less than this (then it would only die again: logged)."""

_CHANGING = frozenset({"deploy", "delete", "load", "unload"})
"""Calls after which the catalog is pushed before the answer, so that every front knows of the change before the
client that asked for it can send another request."""


class FrontStartError(SwapserveError):
    """A front could not start (most often: it could not listen on the address)."""


@dataclass
class _Front:
    index: int
    process: asyncio.subprocess.Process
    started: float
    serving: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolved by the front's ``serving`` notice (None), or with why it could not start."""


class FrontService:
    """Serve ``node`` through ``count`` front processes on ``host:port``.

    The controller binds the address itself (a port in use is refused here, even by another node with fronts)
    and hands the listening socket to each front, which accept connections from it: a busy front takes fewer.
    The fronts reach the controller on a Unix socket in a private temporary directory, removed at :meth:`close`."""

    def __init__(self, node: NodeAPI, metrics: Metrics, host: str, port: int, count: int, gateway: GatewayConfig):
        self.node, self.metrics = node, metrics
        self.host, self.port, self.count, self.gateway = host, port, count, gateway
        self.socket_path = Path(tempfile.mkdtemp(prefix="swapserve-fronts-")) / "socket"
        self._listener: socket.socket | None = None
        self._fronts: dict[int, _Front] = {}
        self._peers: set[Peer] = set()
        self._arenas: dict[Peer, Arena] = {}
        """Each front's shared memory for large outputs."""
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False
        self._changed: set[str] = set()
        self._node_changed = False
        self._known: set[str] | None = None
        """Names of the node's functions (None: to be read again; a function changed since)."""
        self._flush_due = False
        watch = getattr(node, "watch", None)
        if watch is not None:
            watch(self._on_change)

    # -- processes ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the address and start every front; returns once all serve. Raises OSError if the address
        cannot be bound, FrontStartError (every front stopped) if a front cannot start."""
        try:
            self._listener = _bind(self.host, self.port)
        except OSError:
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)
            raise
        await self.listen()
        for i in range(self.count):
            await self._spawn(i)
        waits = [asyncio.wait_for(asyncio.shield(f.serving), START_TIMEOUT_S) for f in self._fronts.values()]
        try:
            errors = await asyncio.gather(*waits)
        except TimeoutError:
            errors = [f"a front did not start within {START_TIMEOUT_S:.0f} s"]
        if problem := next((e for e in errors if e), None):
            await self.close()
            raise FrontStartError(problem)

    async def listen(self) -> None:
        """Take front connections on :attr:`socket_path` (:meth:`start` does, then starts the fronts)."""
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: Peer(self), str(self.socket_path))

    async def _spawn(self, index: int) -> None:
        assert self._listener is not None
        fd = self._listener.fileno()
        config = {"index": index, "socket_path": str(self.socket_path), "listen_fd": fd, "parent_pid": os.getpid(),
                  "log_level": logging.getLogger().getEffectiveLevel(), "gateway": _gateway_dict(self.gateway)}
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "swapserve.fronts.front",
                                                       stdin=asyncio.subprocess.PIPE, pass_fds=(fd,))
        assert process.stdin is not None
        process.stdin.write(json.dumps(config).encode())  # the token travels here, not in argv
        process.stdin.close()
        front = self._fronts[index] = _Front(index, process, time.monotonic())
        asyncio.ensure_future(self._watch(front))

    async def _watch(self, front: _Front) -> None:
        code = await front.process.wait()
        if not front.serving.done():
            front.serving.set_result(f"HTTP front {front.index} exited while starting (exit code {code}); see its "
                                     "output above")
        if self._stopping or self._fronts.get(front.index) is not front:
            return
        lived = time.monotonic() - front.started
        if lived < RESTART_AFTER_S:
            log.error("HTTP front %d exited (code %s) %.1f s after it started; not replacing it", front.index, code,
                      lived)
            del self._fronts[front.index]
            return
        log.error("HTTP front %d exited (code %s); starting another", front.index, code)
        await self._spawn(front.index)

    def drain(self) -> None:
        """Stop taking connections (the node is stopping): every front stops accepting; requests in flight go on."""
        self._stopping = True
        for peer in list(self._peers):
            if not peer.closed:
                peer.notice("drain")
        if self._listener is not None:  # once the fronts closed theirs too, new connections are refused
            self._listener.close()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close every front's connection (calls still in flight there fail) and wait for the fronts to exit."""
        self.drain()
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.close()
        fronts = list(self._fronts.values())
        await asyncio.gather(*(_join(f, timeout_s) for f in fronts))
        self._fronts.clear()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)

    # -- the catalog ----------------------------------------------------------------------------------------

    def _on_change(self, name: str | None) -> None:
        self._known = None
        if name is None:
            self._node_changed = True
        else:
            self._changed.add(name)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        """Send every front what changed since the last push."""
        self._flush_due = False
        if not (self._changed or self._node_changed):
            return
        names, self._changed, self._node_changed = self._changed, set(), False
        update = self._catalog(names)
        for peer in list(self._peers):
            if not peer.closed:
                peer.notice("catalog", update)

    def _info(self, name: str) -> FunctionInfo | None:
        try:
            return self.node.get_function(name)
        except NotFoundError:
            return None

    def _catalog(self, names: set[str] | None) -> dict[str, Any]:
        """The node's flags and the given functions (None: all of them, replacing the front's catalog)."""
        if names is None:
            known = {i.spec.name: i for i in self.node.list_functions()}
        else:  # one function's change need not list every function (O(N) at each push)
            known = {n: i for n in names if (i := self._info(n)) is not None}
        update: dict[str, Any] = {"ready": self.node.is_ready(), "live": self.node.is_live(),
                                  "set": [info_to_wire(i) for i in known.values()]}
        if names is None:
            update["all"] = True
        else:
            update["drop"] = sorted(n for n in names if n not in known)
        return update

    # -- calls from fronts (peer.Handler) -------------------------------------------------------------------

    async def call(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> Answer:
        if op == "infer":
            name, request_id, parameters, margin_ms = args
            arena = self._arenas.get(peer)
            sink = _ArenaSink(arena) if arena is not None else None
            result = await self.node.infer(name, tensors, request_id, parameters, sink=sink, margin_ms=margin_ms)
            return result_to_wire(result), await _place(sink, result.outputs) if sink else result.outputs
        if op == "hello":
            index, pid = args
            self._peers.add(peer)
            arena = self._arenas[peer] = Arena()
            log.debug("HTTP front %d (pid %d) connected", index, pid)
            return {**self._catalog(None), "arena": [str(arena.path), arena.nbytes]}, {}
        answer = await self._control(op, args)
        if op in _CHANGING:
            self._push()
        return answer, {}

    async def _control(self, op: str, args: Any) -> Any:
        node = self.node
        if op == "infer_json":
            name, value, parameters = args
            return await node.infer_json(name, value, parameters)
        if op == "deploy":
            return info_to_wire(await node.deploy(Path(args)))
        if op == "delete":
            await node.delete(args)
            return None
        if op == "load":
            return info_to_wire(await node.load(args))
        if op == "unload":
            return info_to_wire(await node.unload(args))
        if op == "status":
            return asdict(await node.status())
        if op == "scheduling":
            return await node.scheduling()
        if op == "configure_scheduling":
            return await node.configure_scheduling(args)
        if op == "runs":
            since, limit = args
            return await node.runs(since, limit)
        if op == "metrics":
            await self._gather_observations()
            return await self.metrics.render_async(args)
        raise NotFoundError(f"the controller answers no call {op!r}")

    async def _gather_observations(self) -> None:
        """Have every front send what it observed and not sent yet (a scrape then counts every answered request)."""
        peers = [p for p in self._peers if not p.closed]
        results = await asyncio.gather(*(asyncio.wait_for(p.call("flush"), FLUSH_TIMEOUT_S) for p in peers),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("a front's metrics did not come in time for a scrape: %s", r)

    def notice(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> None:
        if op == "free":
            self._arenas[peer].free(args)
        elif op == "observe":
            self._observe(args)
        elif op == "mapped":  # the front mapped our arena and made its own (for inputs): both files can go
            self._arenas[peer].unlink()
            path, nbytes = args
            peer.shared = open_arena(path, nbytes)  # before any call that places inputs: frames arrive in order
            Path(path).unlink(missing_ok=True)
        elif op == "serving":
            front = self._fronts.get(args)
            if front is not None and not front.serving.done():
                front.serving.set_result(None)
            log.info("HTTP front %d serving", args)

    def _observe(self, batch: dict[str, Any]) -> None:
        m = self.metrics
        for route, method, code, seconds in batch["http"]:
            m.observe_http(route, method, code, seconds)
        for seconds in batch.get("lag", ()):
            m.observe_front_loop_lag(seconds)
        known = self._known_names() if batch["requests"] else set()
        for function, code, seconds in batch["requests"]:
            if function in known:  # not a function deleted since (its series are gone)
                m.observe_request(function, code, seconds)

    def _known_names(self) -> set[str]:
        """The node's functions, listed again only after one changed (a list of every function is O(N))."""
        if self._known is None:
            self._known = {i.spec.name for i in self.node.list_functions()}
        return self._known

    def lost(self, peer: Peer) -> None:
        self._peers.discard(peer)
        if (arena := self._arenas.pop(peer, None)) is not None:
            arena.close()


class _ArenaSink:
    """An infer call's outputs straight from the worker's slab into the front's arena (the dispatcher's
    OutputSink), the large ones."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.placed: dict[str, Placed] = {}

    def place(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        if (p := self.arena.place(like)) is None:
            return None
        self.placed[name] = p
        return p.tensor

    def discard(self) -> None:
        for p in self.placed.values():
            self.arena.free(p.offset)
        self.placed.clear()


async def _place(sink: _ArenaSink, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Placed]:
    """``outputs`` with the large ones in the front's arena, sent by reference: those the dispatcher wrote there
    already (``sink.placed``), the others copied now through the same sink (a handler's answer; inline where the
    arena is full). More than ``OFF_LOOP_COPY_BYTES`` are copied on a thread, off the loop every request shares."""
    copies = [(dest, t) for name, t in outputs.items()
              if name not in sink.placed and (dest := sink.place(name, t)) is not None]
    placed: dict[str, torch.Tensor | Placed] = {**outputs, **sink.placed}
    if sum(t.numel() * t.element_size() for _, t in copies) <= OFF_LOOP_COPY_BYTES:
        copy_all(copies)
        return placed
    done = asyncio.ensure_future(asyncio.to_thread(copy_all, copies))
    try:
        await asyncio.shield(done)
    except BaseException:  # cancelled (the front gave up) or failed: the space comes back once the copy ends
        done.add_done_callback(lambda _: sink.discard())
        raise
    return placed


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on the address (what aiohttp would make for one front: SO_REUSEADDR, no SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _gateway_dict(g: GatewayConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(g).items()}


async def _join(front: _Front, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(front.process.wait(), timeout_s)
    except TimeoutError:
        log.warning("HTTP front %d did not stop in time; terminating it", front.index)
        front.process.terminate()
        try:
            await asyncio.wait_for(front.process.wait(), 5)
        except TimeoutError:
            front.process.kill()
            await front.process.wait()


__all__ = ["FrontService", "FrontStartError"]
