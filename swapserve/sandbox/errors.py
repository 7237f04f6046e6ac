"""Errors of tenant handlers and their sandboxes, each with the HTTP status the gateway answers with.

A handler's failure is its own request's failure: the message names the function, what went wrong and,
where the handler raised, the exception and the line of tenant code it came from.
"""

from __future__ import annotations

from swapserve.errors import SwapserveError


class HandlerError(SwapserveError):
    """The handler raised while serving a request (500). ``detail`` holds the tenant's traceback."""

    http_status = 500

    def __init__(self, message: str, detail: str = "", http_status: int | None = None):
        super().__init__(message)
        self.detail = detail
        if http_status is not None:
            self.http_status = http_status


class HandlerLoadError(HandlerError):
    """``handler.py`` could not be loaded: a syntax or import error, no callable ``handle``, a failing
    ``setup()``. 400 when found at deploy (:func:`swapserve.sandbox.validate_handler`), 500 per request."""


class HandlerOutputError(HandlerError):
    """``handle`` returned something that is not a response (500)."""


class HandlerTimeoutError(SwapserveError):
    """The request did not finish within the sandbox timeout; the sandbox running it was killed (504)."""

    http_status = 504


class SandboxCrashedError(SwapserveError):
    """The sandbox process died while serving the request (a crash, a signal, its CPU-time limit) (500)."""

    http_status = 500


class SandboxMemoryError(SandboxCrashedError):
    """The handler ran out of its sandbox's memory limit (500)."""


class SandboxProtocolError(SandboxCrashedError):
    """The sandbox sent something that is not a valid message (tenant code tampering with its channel);
    it was killed (500)."""


class SandboxStartError(SwapserveError):
    """A sandbox could not be started (isolation required but unavailable, a start timeout) (503)."""

    http_status = 503


__all__ = ["HandlerError", "HandlerLoadError", "HandlerOutputError", "HandlerTimeoutError", "SandboxCrashedError",
           "SandboxMemoryError", "SandboxProtocolError", "SandboxStartError"]
