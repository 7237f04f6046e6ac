"""A small real NodeAPI for the gateway's tests (and the fronts' relay tests): torch computations on CPU in one
process, some functions failing the way a loaded node does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp.test_utils as atu

import torch
from torch import nn
from yarl import URL

from swapserve.errors import ConflictError, InvalidInputError, NotFoundError, OverloadedError, UnavailableError
from swapserve.functions.spec import FunctionSpec, load_spec
from swapserve.gateway.common import METRICS
from swapserve.gateway.config import GatewayConfig
from swapserve.gateway.fast import Listener, listen
from swapserve.node.api import DeviceStatus, FunctionInfo, FunctionState, InferResult, NodeStatus
from swapserve.node.runlog import FIELDS, RUNS_ANSWERED, STALL_FIELDS, RunLog

Decl = list[tuple[str, str, list[int]]]
Run = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def make_spec(name: str, inputs: Decl, outputs: Decl, max_batch: int = 8) -> FunctionSpec:
    return FunctionSpec.from_dict({
        "name": name, "model": {"artifact": "artifact"}, "slo_ms": 100, "max_batch": max_batch,
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs]})


class TinyNode:
    """A real NodeAPI in one process: each function is a small torch computation on CPU; some functions are
    configured to fail the way a loaded node does (overload, a bug, a hang)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3).eval()
        self._live = self._ready = True
        self._watchers: list[Callable[[str | None], None]] = []
        self.functions: dict[str, tuple[FunctionInfo, Run]] = {}
        self.errors: dict[str, Exception] = {
            "busy": OverloadedError("queue full", retry_after=2.2, http_status=429),
            "late": OverloadedError("cannot meet the SLO", retry_after=0.3),
            "broken": RuntimeError("secret internal detail"),
        }
        self.side_fetch = False
        self.run_log = RunLog()
        self.clock = 0.0
        self.request_ids: list[str | None] = []
        self.margins: list[float] = []
        """The gateway's margin given with each infer call of a ready function (failing ones too)."""
        self.answer_ms = 0.0
        """What each answer says the node took after its run (``InferResult.answer_ms``)."""
        self.deployed: list[list[str]] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()  # (Python ≥ 3.10: no loop bound at construction)
        self.deploy_done = asyncio.Event()
        linear = ([("x", "FP32", [-1, 4])], [("y", "FP32", [-1, 3])])
        for name in ("linear", "busy", "late", "broken", "hang"):
            self._add(make_spec(name, *linear), lambda i: {"y": self.linear(i["x"])})
        self._add(make_spec("mixed", [("a", "FP16", [-1, 2]), ("ids", "INT64", [-1, 2])],
                            [("sum", "BF16", [-1, 2]), ("positive", "BOOL", [-1, 2])]),
                  lambda i: {"sum": (i["a"].float() + i["ids"].float()).bfloat16(), "positive": i["a"] > 0})
        # Outputs over STREAM_BYTES (2 × 1.5 MiB per row): the response is written from the tensors.
        self._add(make_spec("wide", [("x", "FP32", [-1, 4])], [("big", "FP16", [-1, 786432]),
                                                                ("small", "FP32", [-1, 3])]),
                  lambda i: {"big": torch.arange(786432, dtype=torch.float16).repeat(i["x"].shape[0], 1) * i["x"][:, :1].half(),
                             "small": self.linear(i["x"])})

        # Inputs over PLACE_MIN_BYTES (256 KiB per row): a front sends them through its arena.
        self._add(make_spec("rowsum", [("x", "FP32", [-1, 65536])], [("y", "FP32", [-1])]),
                  lambda i: {"y": i["x"].sum(dim=1)})

    def watch(self, changed: Callable[[str | None], None]) -> None:
        self._watchers.append(changed)

    async def synced(self) -> None:
        """Return once what the gateway sees has caught up with a change made on the node itself (not through
        the gateway). Served directly it has; a front (``test_gateway.run``, relayed) learns it from the catalog
        push, and replaces this with a round trip to the node behind that push."""

    def _changed(self, name: str | None) -> None:
        for changed in self._watchers:
            changed(name)

    @property
    def live(self) -> bool:
        return self._live

    @live.setter
    def live(self, value: bool) -> None:
        self._live = value
        self._changed(None)

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        self._changed(None)

    def _add(self, spec: FunctionSpec, run: Run, version: int = 1) -> FunctionInfo:
        info = FunctionInfo(spec, version, FunctionState.READY, nbytes=64, created_at=1.0)
        self.functions[spec.name] = (info, run)
        self._changed(spec.name)
        return info

    def _set_state(self, name: str, state: FunctionState, reason: str = "") -> FunctionInfo:
        info, run = self.functions[self.get_function(name).spec.name]
        self.functions[name] = (FunctionInfo(info.spec, info.version, state, reason, info.nbytes), run)
        self._changed(name)
        return self.functions[name][0]

    def is_live(self) -> bool:
        return self._live

    def is_ready(self) -> bool:
        return self._ready

    def list_functions(self) -> list[FunctionInfo]:
        return [info for info, _ in self.functions.values()]

    def get_function(self, name: str) -> FunctionInfo:
        if name not in self.functions:
            raise NotFoundError(f"no function {name!r}")
        return self.functions[name][0]

    async def infer_json(self, name: str, value: Any, parameters: dict[str, Any] | None = None) -> Any:
        self.get_function(name)
        if name != "linear":
            raise InvalidInputError(f"function {name!r} has no handler")
        return {"got": value, "parameters": parameters}

    async def infer(self, name: str, inputs: dict[str, torch.Tensor], request_id: str | None = None,
                    parameters: dict[str, Any] | None = None, sink: Any = None,
                    margin_ms: float = 0.0) -> InferResult:
        info, run = self.functions[self.get_function(name).spec.name]
        if info.state is not FunctionState.READY:
            raise UnavailableError(f"function {name!r} is {info.state.value}")
        self.margins.append(margin_ms)
        if name in self.errors:
            raise self.errors[name]
        if name == "hang":
            try:
                await asyncio.Event().wait()  # until the gateway's timeout cancels it
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
        self.request_ids.append(request_id)
        with torch.no_grad():  # parameters come back as a handler's would
            return InferResult(run(inputs), device="cpu", total_ms=0.1, parameters=dict(parameters or {}),
                               answer_ms=self.answer_ms)

    async def deploy(self, bundle: Path) -> FunctionInfo:
        try:
            self.deployed.append(sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()))
            spec = load_spec(bundle)
            if spec.name == "conflict":
                raise ConflictError(f"a deploy of {spec.name!r} is in flight")
            if spec.name == "slow":
                await self.release.wait()
            # The model: a Linear layer whose raw fp32 weights travel in the bundle.
            n_in, n_out = spec.inputs[0].shape[1], spec.outputs[0].shape[1]
            w = torch.frombuffer(bytearray((bundle / "artifact" / "weights.bin").read_bytes()), dtype=torch.float32)
            weight, bias = w[: n_in * n_out].reshape(n_out, n_in), w[n_in * n_out:]
            old = self.functions.get(spec.name)
            return self._add(spec, lambda i: {"y": i["x"] @ weight.T + bias}, old[0].version + 1 if old else 1)
        finally:
            self.deploy_done.set()

    async def delete(self, name: str) -> None:
        self.get_function(name)
        del self.functions[name]
        self._changed(name)

    async def load(self, name: str) -> FunctionInfo:
        return self._set_state(name, FunctionState.READY)

    async def unload(self, name: str) -> FunctionInfo:
        return self._set_state(name, FunctionState.UNAVAILABLE, "unloaded by request")

    async def status(self) -> NodeStatus:
        return self.snapshot()

    def snapshot(self) -> NodeStatus:
        return NodeStatus(ready=self.ready, functions=len(self.functions), host_store_bytes=4096,
                          host_store_capacity=1 << 30, queued=2,
                          devices=(DeviceStatus("cpu", "CPU", 1 << 28, 1 << 20, ("linear",)),))

    async def scheduling(self) -> dict[str, Any]:
        return {"policy": "swapserve", "side_fetch": self.side_fetch}

    async def configure_scheduling(self, changes: dict[str, Any]) -> dict[str, Any]:
        if set(changes) - {"side_fetch"} or not isinstance(changes.get("side_fetch", False), bool):
            raise InvalidInputError(f"cannot change {sorted(changes)}")
        self.side_fetch = changes.get("side_fetch", self.side_fetch)
        return await self.scheduling()

    async def runs(self, since: float | None = None, limit: int = RUNS_ANSWERED) -> dict[str, Any]:
        return {"now": self.clock, "fields": list(FIELDS),
                "runs": [list(r) for r in self.run_log.since(since, limit)],
                "stall_fields": list(STALL_FIELDS), "stalls": [list(x) for x in self.run_log.stalls(since)]}


class FastTestServer(atu.TestServer):
    """The app behind the fast path (as ``serve`` listens) on a port of its own, which the test client talks to."""

    def __init__(self, app: Any, node: Any, gateway: GatewayConfig):
        super().__init__(app)
        self._node, self._gateway = node, gateway
        self._fast: Listener | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        await super().start_server(loop, **kwargs)
        assert self.runner is not None
        self._fast = await listen(self.runner, self._node, self._gateway, self.app[METRICS], host="127.0.0.1", port=0)
        self.port = self._fast.server.sockets[0].getsockname()[1]
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        if self._fast is not None:
            fast, self._fast = self._fast, None
            await fast.close(1.0)
        await super().close()
