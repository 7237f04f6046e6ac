"""What the gateway asks of the node: the boundary between HTTP and the controller.

The gateway decodes HTTP into these calls and encodes their results; every error is a
:class:`swapserve.errors.SwapserveError` carrying its HTTP status (and ``retry_after`` for overload).
Tensors cross this boundary as CPU ``torch.Tensor``s keyed by name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from swapserve.functions.spec import FunctionSpec
from swapserve.node.runlog import RUNS_ANSWERED


class FunctionState(enum.Enum):
    """One explicit lifecycle state per function (after Triton's model_lifecycle)."""

    LOADING = "LOADING"
    """Deploy accepted; artifact being checked and loaded into the host store."""
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"
    """Registered but not serving (unloaded, or failed to load: see ``reason``)."""


@dataclass(frozen=True)
class FunctionInfo:
    spec: FunctionSpec
    version: int
    """Increments with each successful deploy of the same name."""
    state: FunctionState
    reason: str = ""
    """Why the function is not READY, if it is not."""
    nbytes: int = 0
    """Model weight bytes."""
    created_at: float = 0.0
    """Unix time of this version's deploy."""


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, torch.Tensor]
    """CPU tensors, in the function's declared output order."""
    device: str = ""
    """Where it ran (``cuda:0``, ``cpu``)."""
    queue_ms: float = 0.0
    """From admission to dispatch."""
    swapped: bool = False
    """Whether the model was (partly) copied in for this request."""
    compute_ms: float = 0.0
    """The run on the device as its worker timed it (swap-in included), for its whole batch."""
    total_ms: float = 0.0
    """From admission to the result, at the controller."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """The handler's response parameters (a function with a handler); empty otherwise."""
    dispatch_ms: float = 0.0
    """From the scheduling pass that dispatched it to handing the run's message to the worker's pipe
    (the decision, inputs into the IO slab)."""
    decide_ms: float = 0.0
    """Of ``dispatch_ms``, the pass's decision (the scheduler's decide and apply, for all it dispatched); the
    rest is preparing its run's message, and those of the pass's dispatches before it."""
    worker_ms: float = 0.0
    """From the worker receiving the run's message to sending its reply (``compute_ms`` and the worker's
    own bookkeeping). ``total_ms - queue_ms - dispatch_ms - worker_ms`` is the messages' way there and back
    plus the controller's loop getting to the reply."""
    lane: int = 0
    """The device lane it ran in (1: the side lane, beside the first; 0 also for a side-lane run the worker handed
    to the first lane, its model being swapped in there)."""
    phases_ms: dict[str, float] = field(default_factory=dict)
    """Where the worker's run went (:attr:`swapserve.node.messages.RunResult.phases_ms`)."""
    to_worker_ms: float = 0.0
    """From handing the run's message to the worker's pipe to the worker having read it."""
    from_worker_ms: float = 0.0
    """From the worker sending its reply to the controller's loop taking it up. With these two,
    ``total_ms - queue_ms - dispatch_ms - to_worker_ms - worker_ms - from_worker_ms`` is the controller's
    own work on the reply before answering."""
    expected_ms: float = 0.0
    """The scheduler's estimate of the run (its swap and execution, slowed by the runs it expected beside it:
    ``Dispatch.expected_ms``), against which ``compute_ms`` tells how good its cost model was."""
    answer_ms: float = 0.0
    """From the worker sending its reply to the result: the reply's way back and the controller's work on it
    (large outputs copied out of the worker's slab) — the node's part after the run its scheduler planned.
    The gateway learns from it how early the node must finish (:class:`swapserve.gateway.margin.Margins`)."""
    budget_ms: float = 0.0
    """The part of the SLO the node planned the request to, from its admission: the SLO less the gateway's
    margin (``NodeAPI.infer(margin_ms=...)``) when the setting ``gateway_margin`` is on."""
    copy_ms: float = 0.0
    """The part of ``expected_ms`` the scheduler expected for copying the model's missing bytes
    (``Dispatch.copy_ms``; 0 for a resident run): with it, a trace's records say what the estimate counted as a
    swap's fixed overhead then, so that how the scheduler learns it can be replayed offline."""


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    name: str
    pool_bytes: int
    pool_used_bytes: int
    resident: tuple[str, ...]
    partial: tuple[str, ...] = ()
    busy: bool = False
    serving: bool = True
    """False while its worker is dead or starting again (the other devices serve meanwhile)."""
    gpu: str = ""
    """Which of the machine's GPUs it is (the index or UUID ``CUDA_VISIBLE_DEVICES`` gives its worker); empty
    on a CPU. ``device`` numbers the GPUs the node may use, which need not be the machine's numbering."""


@dataclass(frozen=True)
class SandboxStatus:
    """The sandbox pool of one function with a handler."""

    function: str
    starting: int
    idle: int
    busy: int
    queued: int
    """Requests waiting for a free sandbox."""
    started: int
    replaced: int
    """Sandboxes killed and replaced (crash, timeout, memory limit)."""
    requests: int
    failed: int
    cold_start_p50_ms: float | None
    """Median of the recent starts (None before the first)."""


@dataclass(frozen=True)
class NodeStatus:
    ready: bool
    devices: tuple[DeviceStatus, ...]
    functions: int
    host_store_bytes: int
    host_store_capacity: int
    queued: int
    extra: dict[str, float] = field(default_factory=dict)
    sandboxes: tuple[SandboxStatus, ...] = ()


class NodeAPI(Protocol):
    def is_live(self) -> bool: ...

    def is_ready(self) -> bool:
        """True once every worker is up (and until shutdown begins)."""
        ...

    def list_functions(self) -> list[FunctionInfo]: ...

    def get_function(self, name: str) -> FunctionInfo:
        """Raises NotFoundError."""
        ...

    async def infer(self, name: str, inputs: dict[str, torch.Tensor], request_id: str | None = None,
                    parameters: dict[str, Any] | None = None, sink: Any = None,
                    margin_ms: float = 0.0) -> InferResult:
        """Run one request (any batch size up to the function's max_batch): its model, or its handler (which
        sees ``parameters``). ``sink`` (a :class:`swapserve.node.dispatch.OutputSink`) says where the outputs
        may be written straight from the worker's slab; implementations may ignore it. ``margin_ms``: the
        request's time outside the node's plan (the gateway's before and, as expected, after), which the node
        plans to leave free of its SLO (scheduling setting ``gateway_margin``). Raises InvalidInputError
        (400), NotFoundError (404), UnavailableError (503), OverloadedError (429/503 + retry_after); a handler's
        failures carry their own status (500, 504)."""
        ...

    async def infer_json(self, name: str, value: Any, parameters: dict[str, Any] | None = None) -> Any:
        """Run the function's handler on a JSON value (the simple route); its JSON answer. InvalidInputError
        (400) for a function without a handler."""
        ...

    async def deploy(self, bundle: Path) -> FunctionInfo:
        """Register the function in ``bundle`` (a directory holding function.yaml and artifact/), atomically:
        the previous version keeps serving until the new one is READY. ConflictError if a deploy of the same
        name is in flight; SpecError / ArtifactError for a bad bundle."""
        ...

    async def delete(self, name: str) -> None: ...

    async def load(self, name: str) -> FunctionInfo:
        """OIP repository load: make an unloaded function READY again."""
        ...

    async def unload(self, name: str) -> FunctionInfo:
        """OIP repository unload: stop serving (UNAVAILABLE), keep the registration."""
        ...

    async def status(self) -> NodeStatus: ...

    async def scheduling(self) -> dict[str, Any]:
        """The scheduler's settings: ``policy``, ``queue_ahead`` (fixed at start), ``side_fetch``,
        ``swap_piece_ms``, ``queue_ahead_within_ms``, ``peer_copies``, ``side_lanes``, ``place_ahead``,
        ``gateway_margin``, ``spin_ms``, ``slo_values`` (changeable)."""
        ...

    async def configure_scheduling(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change any of the changeable settings now (all or nothing); the settings after. Raises
        InvalidInputError (400) naming what is wrong."""
        ...

    async def runs(self, since: float | None = None, limit: int = RUNS_ANSWERED) -> dict[str, Any]:
        """What the lanes ran lately (:mod:`swapserve.node.runlog`): the last ``limit`` that ended at ``since``
        or later (the node's clock, s), as ``{"now": the node's clock, "fields": [...], "runs": [[...], ...],
        "stall_fields": [...], "stalls": [[...], ...]}``, with every stall of the controller kept that ended at
        ``since`` or later."""
        ...


BUNDLE_ARTIFACT_DIR = "artifact"
"""Inside a deploy bundle: the model artifact's directory, beside function.yaml."""
