"""The HTTP gateway: Open Inference Protocol v2 routes, the management API, metrics and docs, on aiohttp.

It talks to the node only through :class:`swapserve.node.api.NodeAPI`. One middleware turns every failure into
JSON ``{"error": ...}`` with the status the error carries (never an HTML page, and the server stays up), adds
``Retry-After`` to overload answers, echoes ``X-Request-ID``, bounds each request's time, and counts and times
every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from swapserve import __version__, jsonio
from swapserve.errors import AuthError, InvalidInputError, NotFoundError, SwapserveError, retry_after_s
from swapserve.functions.spec import FunctionSpec
from swapserve.gateway import management, oip
from swapserve.gateway.common import (CONFIG, FUNCTION_KEY, MARGINS, METRICS, NODE, REQUEST_ID_HEADER, REQUEST_ID_KEY,
                                      GatewayMetrics, error_response, json_response, read_body, read_json_object, repository_entry,
                                      safe_request_id)
from swapserve.gateway.config import GatewayConfig
from swapserve.gateway.margin import Margins
from swapserve.gateway.openapi import OPENAPI, render_docs
from swapserve.metrics import Metrics
from swapserve.node.api import FunctionInfo, FunctionState, NodeAPI

log = logging.getLogger(__name__)

PLATFORM = "pytorch_export"
EXTENSIONS = ("binary_tensor_data", "model_repository")
THREAD_BYTES = 1 << 20
"""Bodies and outputs above this are decoded/encoded on a thread, so a 64 MiB JSON body does not stall health
probes and other requests for the second it takes."""
STREAM_BYTES = 1 << 20
"""Responses larger than this are written from the output tensors part by part, not joined first."""

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(node: NodeAPI, config: GatewayConfig, metrics: GatewayMetrics | None = None) -> web.Application:
    """The gateway as an aiohttp application. ``metrics`` is shared with the node (which records queue, swap
    and compute times into it, and sets the gauges before each scrape), or relays to it from a front; a fresh
    one is made when none is given."""
    # client_max_size only matters to aiohttp's own body readers, which no route uses (bodies are read with
    # explicit limits); it is set so that one added later inherits a sane bound.
    app = web.Application(middlewares=[_middleware], client_max_size=max(config.max_body_bytes, config.upload_limit))
    app[NODE] = node
    app[CONFIG] = config
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[MARGINS] = Margins()  # shared with the fast path (swapserve.gateway.fast)
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer)
    r.add_post("/v1/functions/{name}/invoke", invoke)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{name}/load", repository_load)
    r.add_post("/v2/repository/models/{name}/unload", repository_unload)
    management.add_routes(app)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/openapi.json", openapi_handler)
    r.add_get("/docs", docs_handler)
    return app


# -- middleware ---------------------------------------------------------------------------------------------


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    config = request.app[CONFIG]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    deploying = request.match_info.route.name == management.DEPLOY_ROUTE
    limit = config.deploy_timeout_s if deploying else config.request_timeout_s
    timeout = asyncio.timeout(limit)
    try:
        async with timeout:
            response = await handler(request)
    except TimeoutError:
        if not timeout.expired():  # raised by the node, not our deadline: a bug
            response = _internal_error(request)
        else:
            what = "the deploy goes on in the background; check GET /api/v1/functions" if deploying else "cancelled"
            response = error_response(504, timed_out_message(limit, what))
    except web.HTTPException as e:  # the router's 404/405 (405 keeps its Allow header)
        headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
        message = (f"method {request.method} not allowed on {request.path} (allowed: {headers['Allow']})"
                   if e.status == 405 and "Allow" in headers else
                   f"no route {request.method} {request.path}" if e.status == 404 else e.reason)
        response = error_response(e.status, message, headers)
    except SwapserveError as e:
        response = _error(e)
    except Exception:
        response = _internal_error(request)
    if not response.prepared and (rid := _request_id(request)) is not None:
        response.headers[REQUEST_ID_HEADER] = rid
    elapsed = time.perf_counter() - started
    metrics = request.app[METRICS]
    method = request.method if request.method in _METHODS else "other"  # any token parses as a method
    metrics.observe_http(route, method, response.status, elapsed)
    if (function := request.get(FUNCTION_KEY)) is not None:
        metrics.observe_request(function, response.status, elapsed)
    return response


def _request_id(request: web.Request) -> str | None:
    """The id echoed in the response: the body's (OIP ``id``) if valid, else the request header's."""
    return request.get(REQUEST_ID_KEY) or safe_request_id(request.headers.get(REQUEST_ID_HEADER))


def timed_out_message(limit: float, what: str = "cancelled") -> str:
    """The 504's message for a request past its time limit (``limit`` seconds)."""
    return f"request timed out after {limit:g} s ({what})"


def error_answer(e: SwapserveError) -> tuple[int, str, dict[str, str]]:
    """A failure's status, message and headers (whatever carries the answer: this app, the fast path)."""
    headers: dict[str, str] = {}
    if (retry := retry_after_s(e)) is not None:
        # Whole seconds, rounded up, and at least 1 so that clients back off rather than spin.
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if isinstance(e, AuthError) and e.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="swapserve management"'
    if e.http_status >= 500 and e.http_status != 503:  # 503s are overload and readiness: routine, not news
        log.warning("%s: %s", type(e).__name__, e)
    return e.http_status, str(e) or type(e).__name__, headers


def internal_error_message(method: str, path: str) -> str:
    """Log the exception being handled under a new incident id; the message that names it."""
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s %s (incident %s)", method, path, incident)
    return f"internal server error (incident {incident}; see the server log)"


def _error(e: SwapserveError) -> web.Response:
    status, message, headers = error_answer(e)
    return error_response(status, message, headers)


def _internal_error(request: web.Request) -> web.Response:
    return error_response(500, internal_error_message(request.method, request.path))


# -- OIP: health and metadata -------------------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    if request.app[NODE].is_live():
        return json_response({"live": True})
    return json_response({"live": False, "error": "node is not live"}, 503)


async def ready(request: web.Request) -> web.Response:
    if request.app[NODE].is_ready():
        return json_response({"ready": True})
    return json_response({"ready": False, "error": "node is not ready"}, 503)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "swapserve", "version": __version__, "extensions": list(EXTENSIONS)})


def _function(request: web.Request) -> FunctionInfo:
    return function_at(request.app[NODE], request.match_info["name"], request.match_info.get("version"))


def function_at(node: NodeAPI, name: str, version: str | None) -> FunctionInfo:
    """The function a path names, at the version it names (only the serving version exists)."""
    info = node.get_function(name)
    if version is not None and version != str(info.version):
        raise NotFoundError(f"function {info.spec.name!r} has no version {version!r} (it serves version "
                            f"{info.version})")
    return info


async def model_metadata(request: web.Request) -> web.Response:
    info = _function(request)
    spec = info.spec
    return json_response({"name": spec.name, "versions": [str(info.version)], "platform": PLATFORM,
                          "inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]})


async def model_ready(request: web.Request) -> web.Response:
    info = _function(request)
    if info.state is FunctionState.READY:
        return json_response({"name": info.spec.name, "ready": True})
    # KServe answers 400 for a known model that is not ready (404 stays for unknown ones).
    reason = f": {info.reason}" if info.reason else ""
    return json_response({"name": info.spec.name, "ready": False,
                          "error": f"function {info.spec.name!r} is {info.state.value}{reason}"}, 400)


# -- OIP: inference -----------------------------------------------------------------------------------------


async def infer(request: web.Request) -> web.Response:
    entered = time.perf_counter()
    info = _function(request)
    request[FUNCTION_KEY] = info.spec.name
    body = await read_body(request, request.app[CONFIG].max_body_bytes)
    call = InferCall()
    margins = request.app[MARGINS]
    try:
        encoded = await answer_infer(request.app[NODE], info, body, request.headers.get(oip.HEADER_LENGTH),
                                     request.headers.get(REQUEST_ID_HEADER), entered, call, margins)
    finally:
        if call.request_id is not None:  # echoed by the middleware, on success or failure
            request[REQUEST_ID_KEY] = call.request_id
    headers = {oip.HEADER_LENGTH: str(encoded.header_length)} if encoded.header_length is not None else {}
    if encoded.nbytes <= STREAM_BYTES:
        call.learn(margins)  # (aiohttp writes it after this handler: not counted)
        return web.Response(body=encoded.body, content_type=encoded.content_type, headers=headers)
    # Large binary outputs go out from the tensors themselves, part by part: no joined copy of the body.
    if (rid := _request_id(request)) is not None:
        headers[REQUEST_ID_HEADER] = rid  # the middleware cannot add it once the head is sent
    response = web.StreamResponse(headers=headers)
    response.content_type = encoded.content_type
    response.content_length = encoded.nbytes
    await response.prepare(request)
    for part in encoded.parts:
        await response.write(part)
    await response.write_eof()
    call.learn(margins)
    return response


@dataclass
class InferCall:
    """What an infer request learned on its way, for its answer's headers whether it succeeds or fails."""

    request_id: str | None = None
    """The body's ``id``, if valid (echoed in X-Request-ID before the header's)."""
    answered: float | None = None
    """``time.perf_counter()`` when the node's result came (None: it did not)."""
    answer_ms: float = 0.0
    """The node's own time after the run (:attr:`swapserve.node.api.InferResult.answer_ms`)."""
    function: str = ""
    shape: Hashable = None
    """The function's declared outputs, as :class:`Margins` learns answers' shapes (:func:`answer_shape`)."""

    def learn(self, margins: Margins) -> None:
        """The answer is out (encoded and written): teach ``margins`` its time after the run."""
        if self.answered is not None:
            margins.observe(self.function, self.answer_ms + (time.perf_counter() - self.answered) * 1e3, self.shape)


def answer_shape(spec: FunctionSpec) -> Hashable:
    """What an answer's time after its run depends on, of a function's declaration: its outputs' datatypes and
    shapes (the same bytes a row), not their names."""
    return tuple((o.datatype, o.shape) for o in spec.outputs)


async def answer_infer(node: NodeAPI, info: FunctionInfo, body: bytes | memoryview, header_length: str | None,
                       header_request_id: str | None, entered: float, call: InferCall,
                       margins: Margins, arrived: float | None = None) -> oip.EncodedBody:
    """An infer request's answer, whatever carries it (this app's route, :mod:`swapserve.gateway.fast`): decode
    and check the body, run it, encode the response. ``entered``: ``time.perf_counter()`` when the request
    was taken up (the response's ``server_ms`` counts from it); ``arrived``, where known, when its first bytes
    were read (the response's ``read_ms`` counts from it to ``entered``: reading the rest, and the event loop's
    turn to take it up). The node is given the request's margin: the time it spent here so far, from its first
    bytes where known, and what its answer is expected to take (``margins``; the caller teaches it,
    :meth:`InferCall.learn`, once the answer is out)."""
    name, shape = info.spec.name, answer_shape(info.spec)
    req = await _maybe_thread(len(body), oip.decode_infer_request, body, info.spec, header_length)
    call.request_id = safe_request_id(req.id)
    margin_ms = ((time.perf_counter() - (entered if arrived is None else arrived)) * 1e3
                 + margins.after_ms(name, shape))
    result = await node.infer(name, req.inputs, req.id or safe_request_id(header_request_id), req.parameters,
                              margin_ms=margin_ms)
    call.answered, call.answer_ms, call.function, call.shape = time.perf_counter(), result.answer_ms, name, shape
    # A handler's own parameters first: ours (timings) describe the run and are never shadowed.
    params = {**result.parameters, "device": result.device, "swapped": result.swapped, "queue_ms": result.queue_ms,
              "compute_ms": result.compute_ms, "total_ms": result.total_ms, "dispatch_ms": result.dispatch_ms,
              "decide_ms": result.decide_ms,
              "worker_ms": result.worker_ms, "lane": result.lane, "phases_ms": result.phases_ms,
              "to_worker_ms": result.to_worker_ms, "from_worker_ms": result.from_worker_ms,
              "expected_ms": result.expected_ms, "answer_ms": result.answer_ms, "budget_ms": result.budget_ms,
              "copy_ms": result.copy_ms,
              "server_ms": (time.perf_counter() - entered) * 1e3}  # request taken up → result, before encoding
    if arrived is not None:
        params["read_ms"] = (entered - arrived) * 1e3
    json_bytes = sum(result.outputs[o.name].nbytes for o in req.outputs if not o.binary and o.name in result.outputs)
    return await _maybe_thread(json_bytes, oip.encode_infer_response, name, str(info.version), result.outputs,
                               req.outputs, req.id, params)


async def invoke(request: web.Request) -> web.Response:
    """The simple route of a function with a handler: any JSON value in, the handler's JSON value out."""
    info = _function(request)
    name, config = info.spec.name, request.app[CONFIG]
    request[FUNCTION_KEY] = name
    body = await read_body(request, config.max_body_bytes)
    try:
        value = jsonio.loads(body) if body.strip() else None
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"malformed JSON: {e}") from None
    answer = await request.app[NODE].infer_json(name, value, dict(request.query))
    return json_response(answer)


async def _maybe_thread(nbytes: int, fn: Callable[..., T], *args: Any) -> T:
    if nbytes > THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# -- OIP: model repository ----------------------------------------------------------------------------------


async def repository_index(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    only_ready = doc.get("ready", False)
    if not isinstance(only_ready, bool):
        raise InvalidInputError("ready: must be true or false")
    infos = request.app[NODE].list_functions()
    return json_response([repository_entry(i) for i in infos if not only_ready or i.state is FunctionState.READY])


async def repository_load(request: web.Request) -> web.Response:
    return await _load_or_unload(request, load=True)


async def repository_unload(request: web.Request) -> web.Response:
    return await _load_or_unload(request, load=False)


async def _load_or_unload(request: web.Request, load: bool) -> web.Response:
    # Guarded by the management token: Triton leaves these open, but they change what the node serves.
    management.require_token(request)
    doc = await read_json_object(request)
    _check_repository_parameters(doc.get("parameters"), load)
    node = request.app[NODE]
    name = request.match_info["name"]
    info = await (node.load(name) if load else node.unload(name))
    return json_response(repository_entry(info))


def _check_repository_parameters(parameters: object, load: bool) -> None:
    """Triton's clients send ``{"parameters": {"unload_dependents": false}}`` with every unload: a function has
    no dependent models apart from its own, which go with it, so either value is taken. A load's ``config`` or
    ``file:`` override, or anything else, is refused: swapserve (un)loads the deployed version."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise InvalidInputError("repository load/unload 'parameters' must be a JSON object")
    taken = set() if load else {"unload_dependents"}
    if not load and not isinstance(parameters.get("unload_dependents", False), bool):
        raise InvalidInputError("unload parameter 'unload_dependents' must be true or false")
    if other := sorted(set(parameters) - taken):
        raise InvalidInputError(f"repository {'load' if load else 'unload'} parameters {other} are not supported "
                                "(swapserve (un)loads the deployed version; deploy a new bundle to change it)")


# -- observability ------------------------------------------------------------------------------------------


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus exposition; ``?name[]=X&name[]=Y`` restricts it to those families (as prometheus_client's
    handler does), a cheap scrape for tools that read a few series."""
    metrics = request.app[METRICS]
    names = request.query.getall("name[]", None)
    return web.Response(body=await metrics.render_async(names), headers={"Content-Type": metrics.content_type})


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(OPENAPI)


async def docs_handler(request: web.Request) -> web.Response:
    return web.Response(text=render_docs(OPENAPI), content_type="text/html")


__all__ = ["EXTENSIONS", "GatewayConfig", "PLATFORM", "make_app"]
