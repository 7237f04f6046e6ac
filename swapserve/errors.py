"""Errors swapserve raises on purpose, each with the HTTP status the gateway answers with.

Every error names its cause in words a user can act on; none leaves the store, the pool or
the registry half-changed.
"""

from __future__ import annotations


class SwapserveError(Exception):
    """Base class: a failure with a clear cause."""

    http_status: int = 500


class ArtifactError(SwapserveError):
    """A model artifact is missing, malformed, or not what its manifest says."""

    http_status = 400


class ExportError(ArtifactError):
    """A model could not be turned into an artifact (torch.export failed or is unsupported)."""


class InvalidInputError(SwapserveError):
    """A request's tensors do not match the model's inputs (names, dtypes, shapes)."""

    http_status = 400


class NotFoundError(SwapserveError):
    """An unknown model or function."""

    http_status = 404


class CapacityError(SwapserveError):
    """Something cannot fit: a model larger than the pool, activations larger than the workspace,
    host store full of pinned models."""

    http_status = 507


class WorkspaceError(CapacityError):
    """A request's activations do not fit the device's activation workspace."""


class PoolBusyError(CapacityError):
    """Every page that could be freed is in use by in-flight work right now; retry later."""

    http_status = 503


class NotResidentError(CapacityError):
    """A side lane was asked to run a model that is not wholly on its device (only lane 0 swaps models in)."""


class BackendError(SwapserveError):
    """The device backend failed (driver error, missing CUDA support)."""

    http_status = 500


class OverloadedError(SwapserveError):
    """Refused at once rather than queued: a full queue (429) or a deadline that cannot be met (503).
    The gateway answers with ``Retry-After: retry_after`` (seconds, rounded up)."""

    def __init__(self, message: str, retry_after: float = 1.0, http_status: int = 503):
        super().__init__(message)
        self.retry_after = retry_after
        self.http_status = http_status


class ConflictError(SwapserveError):
    """The operation clashes with one in flight (e.g. a second deploy of the same name)."""

    http_status = 409


class AuthError(SwapserveError):
    """Missing (401) or wrong (403) management token."""

    def __init__(self, message: str, http_status: int = 401):
        super().__init__(message)
        self.http_status = http_status


class PayloadTooLargeError(SwapserveError):
    http_status = 413


class UnavailableError(SwapserveError):
    """The node or the function is not ready (starting, stopping, unloaded). With ``retry_after`` (seconds:
    when it expects to be ready, as while a worker starts again) the gateway answers with ``Retry-After``."""

    http_status = 503

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_s(e: SwapserveError) -> float | None:
    """When the client should try again (seconds), for the errors that say: overload (1 s unless it says), and
    an unavailable node that knows when it will be ready; None for the others."""
    if isinstance(e, OverloadedError | PoolBusyError):
        return getattr(e, "retry_after", 1.0)
    return getattr(e, "retry_after", None)
