"""What a pool reports: request results, cold starts, statistics, events for metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

CallModel = Callable[[str, str, dict[str, torch.Tensor], float, Any], Awaitable[dict[str, torch.Tensor]]]
"""``call_model(function, model, inputs, deadline, sink) -> outputs``: see :class:`swapserve.sandbox.SandboxPool`."""


@dataclass(frozen=True)
class ColdStart:
    """One sandbox start, in milliseconds."""

    total_ms: float
    """From asking for a sandbox to its hello: what a request waiting for it waits."""
    fork_ms: float
    """Until the process existed (a zygote fork, or an interpreter exec)."""
    isolate_ms: float
    """In the sandbox, from its first instruction: namespaces, mounts, rlimits, Landlock."""
    import_ms: float
    """Importing handler.py."""
    setup_ms: float
    """``setup()``."""


@dataclass(frozen=True)
class HandlerResult:
    outputs: dict[str, torch.Tensor]
    """The response's tensors (CPU, private copies); empty on the JSON route."""
    parameters: dict[str, Any]
    json: Any = None
    """The response on the JSON route."""
    wait_ms: float = 0.0
    """From arrival until a sandbox took the request (a cold start included, if it waited for one)."""
    handler_ms: float = 0.0
    """From handing the request to the sandbox to its response (model calls included)."""
    cold_start_ms: float = 0.0
    """The start of the sandbox this request waited for; 0 if one was warm."""
    model_calls: int = 0


@dataclass(frozen=True)
class SandboxEvent:
    """``starting`` (a cold start begins: the node copies the function's models in meanwhile); for metrics:
    ``started`` (seconds: the cold start), ``request`` (seconds: handler time), ``replaced`` and ``stopped``
    (reason)."""

    function: str
    kind: Literal["starting", "started", "start_failed", "request", "replaced", "stopped"]
    seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class PoolStats:
    function: str
    starting: int
    idle: int
    busy: int
    queued: int
    warm_target: int
    started: int
    replaced: int
    stopped_idle: int
    requests: int
    failed: int
    cold_starts: tuple[ColdStart, ...]
    """The most recent (up to 32)."""
    isolation: dict[str, Any]
    """What the last started sandbox reported (see :func:`swapserve.sandbox.isolation.describe`)."""
