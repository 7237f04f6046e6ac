"""The gateway's OpenAPI 3.1 document, as data, and the self-contained HTML page that renders it at ``/docs``.

A test checks that this document and the application's routes list exactly the same (method, path) pairs, so
the two cannot drift apart.
"""

from __future__ import annotations

import html
from typing import Any

from swapserve import __version__
from swapserve.config import MAX_LANES
from swapserve.node.runlog import FIELDS as RUN_FIELDS
from swapserve.node.runlog import RUNS_ANSWERED, RUNS_KEPT, STALL_FIELDS, STALL_MS, STALLS_KEPT
from swapserve.tensors import DATATYPES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_TEXT = {
    "400": "Malformed or invalid request", "401": "Missing management token", "403": "Wrong token, or management "
    "disabled (no token configured)", "404": "Unknown function, version or route", "409": "Conflicts with an "
    "operation in flight", "413": "Body larger than the configured limit", "415": "Not a gzip'd tar",
    "429": "Queue full: retry after Retry-After seconds", "503": "Not ready, or overloaded: see Retry-After",
    "500": "The function's handler failed (raised, returned something invalid, crashed, ran out of memory)",
    "504": "Timed out",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Function name"}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "Function version (only the serving version exists)"}
_AUTH = [{"managementToken": []}]


def _op(summary: str, tag: str, ok: dict[str, Any], errors: tuple[int, ...] = (), *, params: tuple[dict, ...] = (),
        body: dict[str, Any] | None = None, auth: bool = False, ok_code: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {ok_code: ok, **_errors(*errors)}}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = body
    if auth:
        op["security"] = _AUTH
        op["responses"].update(_errors(401, 403))
    return op


_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _ref("InferRequest")},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Binary tensor extension: the first Inference-Header-Content-Length bytes are an "
                           "InferRequest as JSON; tensors with parameters.binary_data_size follow as raw "
                           "little-endian bytes, in order."},
    },
}
_INFER_OK = {
    "description": "Outputs, as JSON or (when asked) with binary outputs after a JSON header",
    "headers": {"Inference-Header-Content-Length": {"schema": {"type": "integer"},
                                                    "description": "Length of the JSON header (binary responses)"}},
    "content": {"application/json": {"schema": _ref("InferResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
_INFER_ERRORS = (400, 404, 413, 429, 500, 503, 504)
_OK = _json({"type": "object"}, "OK")
_MODEL_META = _json(_ref("ModelMetadata"), "Model metadata")
_READY = {"description": "READY (400: known but not READY, per the KServe spec)"}
_FUNCTION = _json(_ref("FunctionInfo"), "The function")
_STATE = _json(_ref("RepositoryEntry"), "The function's new state")

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "swapserve gateway", "version": __version__,
             "description": "Open Inference Protocol v2 (KServe / Triton) plus swapserve's management API. "
                            "Every error is JSON {\"error\": \"...\"}; overload answers carry Retry-After. "
                            "Send X-Request-ID to have it echoed."},
    "paths": {
        "/v2/health/live": {"get": _op("Liveness", "health", _OK, (503,))},
        "/v2/health/ready": {"get": _op("Readiness: every worker is up", "health", _OK, (503,))},
        "/v2": {"get": _op("Server metadata", "metadata", _json(_ref("ServerMetadata"), "Server metadata"))},
        "/v2/models/{name}": {"get": _op("Model metadata", "metadata", _MODEL_META, (404,), params=(_NAME,))},
        "/v2/models/{name}/versions/{version}": {
            "get": _op("Model metadata of a version", "metadata", _MODEL_META, (404,), params=(_NAME, _VERSION))},
        "/v2/models/{name}/ready": {"get": _op("Model readiness", "health", _READY, (400, 404), params=(_NAME,))},
        "/v2/models/{name}/versions/{version}/ready": {
            "get": _op("Model readiness of a version", "health", _READY, (400, 404), params=(_NAME, _VERSION))},
        "/v2/models/{name}/infer": {
            "post": _op("Inference", "inference", _INFER_OK, _INFER_ERRORS, params=(_NAME,), body=_INFER_BODY)},
        "/v2/models/{name}/versions/{version}/infer": {
            "post": _op("Inference on a version", "inference", _INFER_OK, _INFER_ERRORS, params=(_NAME, _VERSION),
                        body=_INFER_BODY)},
        "/v1/functions/{name}/invoke": {
            "post": _op("Run a function's handler on a JSON value (the query string becomes its parameters)",
                        "inference", _json({}, "The handler's JSON answer"), (400, 404, 413, 429, 500, 503, 504),
                        params=(_NAME,), body={"required": False, "content": {"application/json": {"schema": {}}}})},
        "/v2/repository/index": {
            "post": _op("List functions and their states", "repository",
                        _json({"type": "array", "items": _ref("RepositoryEntry")}, "The index"), (400,),
                        body={"required": False, "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"ready": {"type": "boolean",
                                                                       "description": "Only READY functions"}}}}}})},
        "/v2/repository/models/{name}/load": {
            "post": _op("Serve an unloaded function again", "repository", _STATE, (400, 404, 409), params=(_NAME,),
                        auth=True)},
        "/v2/repository/models/{name}/unload": {
            "post": _op("Stop serving a function (keeps its registration)", "repository", _STATE, (400, 404, 409),
                        params=(_NAME,), auth=True,
                        body={"required": False, "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"parameters": {"type": "object", "properties": {
                                "unload_dependents": {"type": "boolean", "description": (
                                    "Taken as Triton's clients send it: a function's models go with it")}}}}}}}})},
        "/api/v1/functions": {
            "get": _op("List functions", "management", _json({"type": "object", "properties": {
                "functions": {"type": "array", "items": _ref("FunctionInfo")}}}, "Every function"), auth=True),
            "post": _op("Deploy a function bundle (gzip'd tar of function.yaml + artifact/)", "management",
                        _FUNCTION, (400, 409, 413, 415, 504), auth=True, ok_code="201", body={
                            "required": True,
                            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}}),
        },
        "/api/v1/functions/{name}": {
            "get": _op("Describe a function", "management", _FUNCTION, (404,), params=(_NAME,), auth=True),
            "delete": _op("Delete a function", "management", _json({"type": "object", "properties": {
                "deleted": {"type": "string"}}}, "Deleted"), (404, 409), params=(_NAME,), auth=True),
        },
        "/api/v1/status": {"get": _op("Node status", "management", _json(_ref("NodeStatus"), "Status"), auth=True)},
        "/api/v1/scheduling": {
            "get": _op("The scheduler's settings", "management", _json(_ref("Scheduling"), "Settings"), auth=True),
            "patch": _op("Change side_fetch, swap_piece_ms, queue_ahead_within_ms, peer_copies, side_lanes, "
                         "place_ahead, gateway_margin, spin_ms and/or slo_values now (all or nothing)",
                         "management", _json(_ref("Scheduling"), "The settings after the change"), (400,), auth=True,
                         body={"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "properties": {
                                 "side_fetch": {"type": "boolean"},
                                 "swap_piece_ms": {"type": "number", "minimum": 0, "maximum": 1000},
                                 "queue_ahead_within_ms": {"type": ["number", "null"], "minimum": 0,
                                                           "maximum": 1000},
                                 "peer_copies": {"type": "boolean"},
                                 "side_lanes": {"type": ["integer", "null"], "minimum": 0,
                                                "maximum": MAX_LANES - 1},
                                 "place_ahead": {"type": "boolean"},
                                 "gateway_margin": {"type": "boolean"},
                                 "spin_ms": {"type": "number", "minimum": 0, "maximum": 1000},
                                 "slo_values": {"type": "boolean"}}}}}}),
        },
        "/api/v1/runs": {"get": _op(
            "What the lanes ran lately: every run, piece of a swap and prefetch the workers finished (the last "
            f"{RUNS_KEPT} are kept), with its device, lane, function and when its lane took it up and answered it "
            "on the node's clock; and the controller's stalls", "management", _json(_ref("Runs"), "Runs"), (400,),
            auth=True, params=({
                "name": "since", "in": "query", "required": False, "schema": {"type": "number"},
                "description": "Only the runs that ended at this time or later (the node's clock, s: the 'now' "
                               "of an earlier answer)"}, {
                "name": "limit", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": RUNS_KEPT, "default": RUNS_ANSWERED},
                "description": "The last this many of them"}))},
        "/metrics": {"get": _op("Prometheus metrics", "observability", {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/openapi.json": {"get": _op("This document", "observability", _OK)},
        "/docs": {"get": _op("This document as a web page", "observability", {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}})},
    },
    "components": {
        "securitySchemes": {"managementToken": {"type": "http", "scheme": "bearer"}},
        "responses": {f"E{code}": _json(_ref("Error"), text) for code, text in _ERROR_TEXT.items()},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Datatype": {"type": "string", "enum": list(DATATYPES)},
            "Shape": {"type": "array", "items": {"type": "integer"}},
            "TensorMetadata": {"type": "object", "properties": {
                "name": {"type": "string"}, "datatype": _ref("Datatype"), "shape": _ref("Shape")}},
            "Tensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
                "name": {"type": "string"}, "shape": _ref("Shape"), "datatype": _ref("Datatype"),
                "data": {"type": "array", "description": "Flat row-major, or nested to the shape"},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}}}},
            "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
                "inputs": {"type": "array", "items": _ref("Tensor")},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}},
            "InferResponse": {"type": "object", "properties": {
                "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                "parameters": {"type": "object", "description": "device, lane, swapped, queue_ms, compute_ms, total_ms, dispatch_ms, decide_ms, worker_ms, to_worker_ms, from_worker_ms, expected_ms, copy_ms, answer_ms, budget_ms, phases_ms, server_ms, read_ms"},
                "outputs": {"type": "array", "items": _ref("Tensor")}}},
            "ServerMetadata": {"type": "object", "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}}}},
            "ModelMetadata": {"type": "object", "properties": {
                "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"}, "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("TensorMetadata")}}},
            "RepositoryEntry": {"type": "object", "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "state": {"type": "string", "enum": ["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]},
                "reason": {"type": "string"}}},
            "FunctionInfo": {"type": "object", "properties": {
                "name": {"type": "string"}, "version": {"type": "integer"}, "state": {"type": "string"},
                "reason": {"type": "string"}, "nbytes": {"type": "integer"}, "created_at": {"type": "number"},
                "spec": {"type": "object", "description": "function.yaml, as parsed"}}},
            "DeviceStatus": {"type": "object", "properties": {
                "device": {"type": "string"}, "name": {"type": "string"}, "pool_bytes": {"type": "integer"},
                "pool_used_bytes": {"type": "integer"}, "resident": {"type": "array", "items": {"type": "string"}},
                "partial": {"type": "array", "items": {"type": "string"}}, "busy": {"type": "boolean"},
                "serving": {"type": "boolean"},
                "gpu": {"type": "string", "description": "the machine's GPU (index or UUID) behind device; "
                                                         "empty on a CPU"}}},
            "Runs": {"type": "object", "properties": {
                "now": {"type": "number", "description": "the node's clock (s) when it answered"},
                "fields": {"type": "array", "items": {"type": "string"},
                           "description": "what each run's list holds, in order: " + ", ".join(RUN_FIELDS)},
                "runs": {"type": "array", "description": "in the order they ended",
                         "items": {"type": "array"}},
                "stall_fields": {"type": "array", "items": {"type": "string"},
                                 "description": "what each stall's list holds, in order: " + ", ".join(STALL_FIELDS)},
                "stalls": {"type": "array", "items": {"type": "array"},
                           "description": f"turns of the controller's event loop (what 'loop') and collections in its "
                                          f"process ('gc N') that held it {STALL_MS:g} ms or more and ended at 'since' "
                                          f"or later (the last {STALLS_KEPT} are kept), with the controller thread's "
                                          f"CPU time meanwhile; a turn is timed only while the controller polls "
                                          f"(serve --spin-ms, runs in flight)"}}},
            "Scheduling": {"type": "object", "properties": {
                "policy": {"type": "string", "enum": ["swapserve", "fifo_lru", "dedicated"]},
                "queue_ahead": {"type": "boolean", "description": "fixed at start"},
                "side_fetch": {"type": "boolean"}, "swap_piece_ms": {"type": "number"},
                "queue_ahead_within_ms": {"type": ["number", "null"],
                                          "description": "queue ahead only this close to the run's end "
                                                         "(null: always)"},
                "peer_copies": {"type": "boolean",
                                "description": "copy a model from another device that holds it (NVLink)"},
                "side_lanes": {"type": ["integer", "null"],
                               "description": "how many of each device's side lanes new runs take (null: all)"},
                "place_ahead": {"type": "boolean",
                                "description": "place a queued run's pages while the run before it executes"},
                "gateway_margin": {"type": "boolean",
                                   "description": "plan each request to leave its SLO room for the gateway's "
                                                  "part (decoding; the answer's way out, as learned)"},
                "slo_values": {"type": "boolean",
                               "description": "eviction values weigh a swap's cost as a share of the function's "
                                              "SLO (models of tight SLOs stay first)"},
                "spin_ms": {"type": "number",
                            "description": "the controller polls rather than sleeps while runs are in flight and "
                                           "this long after each arrival and each run's end, and each worker this "
                                           "long after each answer (0: off; costs up to a core each while "
                                           "requests flow)"}}},
            "NodeStatus": {"type": "object", "properties": {
                "ready": {"type": "boolean"}, "devices": {"type": "array", "items": _ref("DeviceStatus")},
                "functions": {"type": "integer"}, "host_store_bytes": {"type": "integer"},
                "host_store_capacity": {"type": "integer"}, "queued": {"type": "integer"},
                "extra": {"type": "object", "additionalProperties": {"type": "number"}},
                "sandboxes": {"type": "array", "items": _ref("SandboxStatus")}}},
            "SandboxStatus": {"type": "object", "description": "The sandbox pool of a function with a handler.",
                              "properties": {
                "function": {"type": "string"}, "starting": {"type": "integer"}, "idle": {"type": "integer"},
                "busy": {"type": "integer"}, "queued": {"type": "integer"}, "started": {"type": "integer"},
                "replaced": {"type": "integer"}, "requests": {"type": "integer"}, "failed": {"type": "integer"},
                "cold_start_p50_ms": {"type": ["number", "null"]}}},
        },
    },
}


def render_docs(doc: dict[str, Any] = OPENAPI) -> str:
    """One HTML page listing every operation, rendered here so the page needs no script and fetches nothing."""
    e = html.escape
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(op["responses"])
            lock = " 🔒" if op.get("security") else ""
            rows.append(f"<tr><td class=m>{e(method.upper())}</td><td><code>{e(path)}</code></td>"
                        f"<td>{e(op['summary'])}{lock}</td><td>{e(codes)}</td></tr>")
    info = doc["info"]
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{e(info['title'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.35em .8em;text-align:left}}.m{{font-weight:bold}}</style></head>
<body><h1>{e(info['title'])} {e(info['version'])}</h1><p>{e(info['description'])}</p>
<p>🔒 needs <code>Authorization: Bearer &lt;token&gt;</code>. Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>
<table><tr><th>Method</th><th>Path</th><th>What</th><th>Statuses</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


__all__ = ["OPENAPI", "render_docs"]
