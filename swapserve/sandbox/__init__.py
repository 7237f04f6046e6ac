"""Tenant handlers in sandbox processes, with model calls redirected to the controller.

A function may ship a ``handler.py`` (``setup()`` once per sandbox, ``handle(request, models)`` per request;
see docs/handlers.md). It runs in a pool of isolated processes per function, never in a GPU worker; each
model call it makes returns a future at once, travels to the controller (which schedules it like any
request, against the request's deadline) and its tensors go through shared memory both ways.

Tenant-facing: :class:`Request`, :class:`Response`, :class:`ModelFuture`, :class:`ModelCallError`.
Node-facing: :class:`SandboxManager` (one per node), :class:`SandboxPool` (one per function version),
:func:`validate_handler` (deploy time), :class:`SandboxConfig` / :class:`SandboxLimits`.
"""

from swapserve.sandbox.api import ModelCallError, ModelFuture, ModelHandle, ModelInputError, Models, Request, Response
from swapserve.sandbox.config import ModelSignature, SandboxConfig, SandboxLimits
from swapserve.sandbox.errors import (HandlerError, HandlerLoadError, HandlerOutputError, HandlerTimeoutError,
                                      SandboxCrashedError, SandboxMemoryError, SandboxProtocolError, SandboxStartError)
from swapserve.sandbox.manager import HandlerInfo, SandboxManager, check_handler_path, validate_handler
from swapserve.sandbox.pool import SandboxPool
from swapserve.sandbox.types import CallModel, ColdStart, HandlerResult, PoolStats, SandboxEvent

__all__ = [
    "CallModel", "ColdStart", "HandlerError", "HandlerInfo", "HandlerLoadError", "HandlerOutputError",
    "HandlerResult", "HandlerTimeoutError", "ModelCallError", "ModelFuture", "ModelHandle", "ModelInputError",
    "ModelSignature", "Models", "PoolStats", "Request", "Response", "SandboxConfig", "SandboxCrashedError",
    "SandboxEvent", "SandboxLimits", "SandboxManager", "SandboxMemoryError", "SandboxPool", "SandboxProtocolError",
    "SandboxStartError", "check_handler_path", "validate_handler",
]
