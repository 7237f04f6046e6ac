"""A front's view of the node: :class:`RemoteNode` implements ``NodeAPI`` over a :class:`Peer` to the controller,
and :class:`RelayMetrics` sends the gateway's HTTP observations there.

The synchronous calls the gateway makes on every request (``is_live``, ``is_ready``, ``get_function``,
``list_functions``) read a catalog that the controller pushes to each front when a function's state or the
node's readiness changes, so no request waits for them; the rest are calls to the controller. Metrics have one
registry, the controller's: observations are sent in batches (every ``FLUSH_S``), and a scrape asks the
controller, which first collects every front's pending batch, so a scrape counts every request answered before
it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from swapserve.errors import NotFoundError
from swapserve.fronts.arena import Arena, open_arena
from swapserve.fronts.peer import Answer, Peer, Placed, Tensors
from swapserve.functions.spec import FunctionSpec
from swapserve.instruments import CONTENT_TYPE
from swapserve.node.api import DeviceStatus, FunctionInfo, FunctionState, InferResult, NodeStatus, SandboxStatus
from swapserve.node.runlog import RUNS_ANSWERED

FLUSH_S = 0.2
"""How long a front holds its HTTP observations before sending them to the controller."""

_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(InferResult) if f.name != "outputs")


def info_to_wire(info: FunctionInfo) -> dict[str, Any]:
    return {"spec": info.spec.to_dict(), "version": info.version, "state": info.state.value, "reason": info.reason,
            "nbytes": info.nbytes, "created_at": info.created_at}


def info_from_wire(d: dict[str, Any]) -> FunctionInfo:
    return FunctionInfo(FunctionSpec.from_dict(d["spec"]), d["version"], FunctionState(d["state"]), d["reason"],
                        d["nbytes"], d["created_at"])


def result_to_wire(r: InferResult) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _RESULT_FIELDS}


def status_from_wire(d: dict[str, Any]) -> NodeStatus:
    return NodeStatus(d["ready"], tuple(DeviceStatus(**{**x, "resident": tuple(x["resident"]),
                                                        "partial": tuple(x["partial"])}) for x in d["devices"]),
                      d["functions"], d["host_store_bytes"], d["host_store_capacity"], d["queued"], d["extra"],
                      tuple(SandboxStatus(**x) for x in d["sandboxes"]))


class RemoteNode:
    """``NodeAPI`` in a front process. It is also the front's end of the connection: it takes the controller's
    notices (catalog updates, ``drain``) and answers its calls (``flush``)."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.metrics = RelayMetrics(self)
        """What the gateway records into (``make_app(node, config, node.metrics)``)."""
        self.inputs: Arena | None = None
        """Where large inputs go to the controller (made at connect)."""
        self._functions: dict[str, FunctionInfo] = {}
        self._ready = False
        self._live = True
        self.drain = asyncio.Event()
        """Set when the controller says to stop taking connections (it is stopping), or is gone."""

    # -- the connection -------------------------------------------------------------------------------------

    async def connect(self, path: str, index: int, pid: int) -> None:
        """Connect to the controller and take the catalog."""
        loop = asyncio.get_running_loop()
        _, self.peer = await loop.create_unix_connection(lambda: Peer(self), path)
        value, _ = await self.peer.call("hello", [index, pid])
        arena_path, arena_bytes = value["arena"]
        self.peer.shared = open_arena(arena_path, arena_bytes)
        self.inputs = Arena(directory=Path(arena_path).parent)
        self.peer.notice("mapped", [str(self.inputs.path), self.inputs.nbytes])
        self._apply(value)

    async def call(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> Answer:
        if op == "flush":
            self.metrics.flush()
            return None, {}
        raise NotFoundError(f"a front answers no call {op!r}")

    def notice(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> None:
        if op == "free" and self.inputs is not None:  # the controller let go of inputs we placed
            self.inputs.free(args)
        elif op == "catalog":
            self._apply(args)
        elif op == "drain":
            self.drain.set()

    def lost(self, peer: Peer) -> None:
        self._live = self._ready = False
        self.drain.set()
        if self.inputs is not None:
            self.inputs.close()  # (the file, if the controller did not live to unlink it)

    def _apply(self, update: dict[str, Any]) -> None:
        """A catalog update: the node's flags, and the functions that changed (or, with ``all``, every one)."""
        self._ready, self._live = update["ready"], update["live"]
        if update.get("all"):
            self._functions = {}
        for d in update.get("set", ()):
            info = info_from_wire(d)
            self._functions[info.spec.name] = info
        for name in update.get("drop", ()):
            self._functions.pop(name, None)

    def _peer(self) -> Peer:
        assert self.peer is not None, "connect() first"
        return self.peer

    # -- NodeAPI --------------------------------------------------------------------------------------------

    def is_live(self) -> bool:
        return self._live

    def is_ready(self) -> bool:
        return self._ready and not self.drain.is_set()

    def list_functions(self) -> list[FunctionInfo]:
        return list(self._functions.values())

    def get_function(self, name: str) -> FunctionInfo:
        info = self._functions.get(name)
        if info is None:
            raise NotFoundError(f"no function {name!r}")
        return info

    async def infer(self, name: str, inputs: dict[str, torch.Tensor], request_id: str | None = None,
                    parameters: dict[str, Any] | None = None, sink: Any = None,
                    margin_ms: float = 0.0) -> InferResult:
        value, outputs = await self._peer().call("infer", [name, request_id, parameters, margin_ms],
                                                 self._place(inputs))
        return InferResult(outputs, **value)

    def _place(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Placed]:
        """``inputs`` with the large ones copied into our arena, sent by reference: a frame of a few hundred bytes
        instead of one the controller's loop reads in pieces (a 294 KiB image is more than a Unix socket's buffer).
        The controller frees each once its last view of it goes (after the dispatcher copied it into a slab, or
        the request ended); inline where the arena is full."""
        out: dict[str, torch.Tensor | Placed] = {}
        for name, t in inputs.items():
            p = self.inputs.place(t) if self.inputs is not None else None
            if p is not None:
                p.tensor.copy_(t)
            out[name] = t if p is None else p
        return out

    async def infer_json(self, name: str, value: Any, parameters: dict[str, Any] | None = None) -> Any:
        answer, _ = await self._peer().call("infer_json", [name, value, parameters])
        return answer

    async def deploy(self, bundle: Path) -> FunctionInfo:
        return info_from_wire((await self._peer().call("deploy", str(bundle)))[0])

    async def delete(self, name: str) -> None:
        await self._peer().call("delete", name)

    async def load(self, name: str) -> FunctionInfo:
        return info_from_wire((await self._peer().call("load", name))[0])

    async def unload(self, name: str) -> FunctionInfo:
        return info_from_wire((await self._peer().call("unload", name))[0])

    async def status(self) -> NodeStatus:
        return status_from_wire((await self._peer().call("status"))[0])

    async def scheduling(self) -> dict[str, Any]:
        return (await self._peer().call("scheduling"))[0]

    async def configure_scheduling(self, changes: dict[str, Any]) -> dict[str, Any]:
        return (await self._peer().call("configure_scheduling", changes))[0]

    async def runs(self, since: float | None = None, limit: int = RUNS_ANSWERED) -> dict[str, Any]:
        return (await self._peer().call("runs", (since, limit)))[0]

    async def render_metrics(self, names: list[str] | None) -> bytes:
        return (await self._peer().call("metrics", names))[0]


class RelayMetrics:
    """The gateway's part of :class:`swapserve.metrics.Metrics` in a front: observations go to the controller's
    registry in batches; a scrape renders that registry."""

    content_type: str = CONTENT_TYPE

    def __init__(self, node: RemoteNode) -> None:
        self.node = node
        self._http: list[tuple[str, str, int, float]] = []
        self._requests: list[tuple[str, int, float]] = []
        self._lag: list[float] = []
        self._timer: asyncio.TimerHandle | None = None

    def observe_http(self, route: str, method: str, code: int, seconds: float) -> None:
        self._http.append((route, method, code, seconds))
        self._schedule()

    def observe_request(self, function: str, code: int, seconds: float) -> None:
        self._requests.append((function, code, seconds))

    def observe_loop_lag(self, seconds: float) -> None:
        """The front's own event loop (:func:`swapserve.metrics.watch_loop`)."""
        self._lag.append(seconds)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Send what was observed since the last flush (nothing to send: nothing sent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not (self._http or self._requests or self._lag) or self.node.peer is None or self.node.peer.closed:
            return
        batch = {"http": self._http, "requests": self._requests, "lag": self._lag}
        self._http, self._requests, self._lag = [], [], []
        self.node.peer.notice("observe", batch)

    async def render_async(self, names: Iterable[str] | None = None) -> bytes:
        self.flush()
        return await self.node.render_metrics(list(names) if names is not None else None)


__all__ = ["FLUSH_S", "RelayMetrics", "RemoteNode", "info_from_wire", "info_to_wire", "result_to_wire",
           "status_from_wire"]
