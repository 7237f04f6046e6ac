"""What the gateway's route modules share: application keys, JSON responses, bounded body reads."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

from aiohttp import web

from swapserve import jsonio
from swapserve.errors import InvalidInputError, PayloadTooLargeError
from swapserve.gateway.config import GatewayConfig
from swapserve.gateway.margin import Margins
from swapserve.node.api import FunctionInfo, NodeAPI



class GatewayMetrics(Protocol):
    """What the gateway records and renders: :class:`swapserve.metrics.Metrics` in the node's process, a
    :class:`swapserve.fronts.remote.RelayMetrics` in an HTTP front."""

    content_type: str

    def observe_http(self, route: str, method: str, code: int, seconds: float) -> None: ...

    def observe_request(self, function: str, code: int, seconds: float) -> None: ...

    async def render_async(self, names: Iterable[str] | None = None) -> bytes: ...


NODE = web.AppKey("swapserve.node", NodeAPI)
CONFIG = web.AppKey("swapserve.config", GatewayConfig)
METRICS = web.AppKey("swapserve.metrics", GatewayMetrics)
MARGINS = web.AppKey("swapserve.margins", Margins)

REQUEST_ID_HEADER = "X-Request-ID"


def _request_key(name: str, kind: type) -> Any:
    # aiohttp >= 3.14 wants typed keys for per-request storage (it warns on strings); older releases, which
    # GPU images may carry, have no RequestKey and take the string.
    key_type = getattr(web, "RequestKey", None)
    return key_type(name, kind) if key_type is not None else name


FUNCTION_KEY = _request_key("swapserve.function", str)
"""Set on a request once it is known to name an existing function: the middleware then counts it per function
(unknown names are not used as labels, so a scan of random names cannot blow up the metrics)."""
REQUEST_ID_KEY = _request_key("swapserve.request_id", str)
"""Set by a handler that learns the request id from the body (OIP ``id``)."""

_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")
"""Request ids echoed in a header: printable ASCII, bounded, so a body ``id`` cannot inject headers."""

SMALL_BODY_BYTES = 1 << 20
"""Limit of control-plane bodies (repository index/load/unload): they are a few bytes of JSON."""


def safe_request_id(value: object) -> str | None:
    return value if isinstance(value, str) and _SAFE_ID.fullmatch(value) else None


def json_bytes(data: Any) -> bytes:
    """A JSON body, compact."""
    return jsonio.dumps(data)


def error_body(message: str) -> bytes:
    """The JSON body of every error answer."""
    return json_bytes({"error": message})


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_bytes(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type="application/json", headers=headers)


def too_large(limit: int, what: str = "request body") -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) past ``limit`` — at once when Content-Length says so, else as soon as the
    count passes it, so an oversized body is never held in memory."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: web.Request, limit: int = SMALL_BODY_BYTES) -> dict[str, Any]:
    """An optional JSON object body; an empty body is ``{}``."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        doc = jsonio.loads(body)
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"the body must be a JSON object, not {type(doc).__name__}")
    return doc


def repository_entry(info: FunctionInfo) -> dict[str, Any]:
    """A function as the OIP repository index lists it (versions are strings in OIP)."""
    return {"name": info.spec.name, "version": str(info.version), "state": info.state.value, "reason": info.reason}


def function_json(info: FunctionInfo) -> dict[str, Any]:
    """A function as the management API shows it."""
    return {"name": info.spec.name, "version": info.version, "state": info.state.value, "reason": info.reason,
            "nbytes": info.nbytes, "created_at": info.created_at, "spec": info.spec.to_dict()}
