"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) codec: request and response bodies ⇄ named CPU tensors.

Pure functions, no HTTP framework, so the codec is tested alone and reused by clients and benchmarks.

Request:  ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data", "parameters"}],
"outputs": [{"name", "parameters": {"binary_data": bool}}]}``; ``data`` flat row-major or nested to the shape.
Binary tensor extension: with the header ``Inference-Header-Content-Length: N`` the first N bytes are the JSON
header, and each tensor whose ``parameters.binary_data_size`` is set follows as raw little-endian bytes, in
order. Responses use the same layout: ``{"model_name", "model_version", "id", "parameters", "outputs": [...]}``.

Every problem with a request raises :class:`InvalidInputError` (HTTP 400) naming the tensor and what is
wrong; where several are wrong at once, all are listed. BYTES (string) tensors are not supported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch

from swapserve import jsonio
from swapserve.errors import InvalidInputError
from swapserve.functions.spec import FunctionSpec
from swapserve.tensors import DATATYPES, datatype_of, element_size, numpy_dtype, torch_dtype

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

_INTS = frozenset({"UINT8", "INT8", "INT16", "INT32", "INT64"})
_DATA_KINDS = {dt: ("b", "true or false") if dt == "BOOL" else ("iu", "integers") if dt in _INTS else ("iuf", "numbers")
               for dt in DATATYPES}
"""The numpy kinds a datatype's JSON data may parse to, and what the error message asks for."""
_MAX_PROBLEMS = 10
"""Problems listed in one error message; a request with a thousand bad inputs gets a readable answer."""


@dataclass(frozen=True)
class OutputRequest:
    """One output to send back, and how."""

    name: str
    binary: bool
    """Raw bytes after the JSON header (binary tensor extension) rather than a JSON ``data`` list."""


@dataclass(frozen=True)
class InferRequest:
    inputs: dict[str, torch.Tensor]
    """CPU tensors, checked against the function's declared inputs, in the request's order."""
    outputs: tuple[OutputRequest, ...]
    """The outputs to return, in order: those the request names, else every declared output."""
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedBody:
    parts: tuple[bytes | memoryview, ...]
    """The JSON header, then each binary tensor's bytes — views of the tensors themselves, not copies, so a
    server can write a large response without copying it (see :attr:`body` for one ``bytes``)."""
    header_length: int | None
    """Value for ``Inference-Header-Content-Length``; None when the body is plain JSON."""

    @property
    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in self.parts)

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self.header_length is None else BINARY_CONTENT_TYPE


@dataclass
class _Tensor:
    """A tensor's JSON header as parsed, before its data is decoded."""

    name: str
    kind: str
    """``input`` or ``output``: for messages."""
    datatype: str = ""
    shape: tuple[int, ...] = ()
    data: Any = None
    binary_size: int | None = None
    valid: bool = True
    """False when something besides the name is malformed (already reported)."""

    @property
    def where(self) -> str:
        return f"{self.kind} {self.name!r}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# -- requests -----------------------------------------------------------------------------------------------


def decode_infer_request(body: bytes | memoryview, spec: FunctionSpec,
                         header_length: str | int | None = None) -> InferRequest:
    """Decode and check an infer request for ``spec``: names, datatypes and shapes as declared (-1 = any
    batch >= 1, the same for every input, at most ``spec.max_batch``), data consistent with the shapes.
    Binary tensors of a writable ``body`` are its own bytes (the caller gives the buffer up); of a read-only
    one, copies."""
    doc, rest = _split(body, header_length)
    problems: list[str] = []
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        problems.append(f"id: must be a string, not {_short(request_id)}")
        request_id = None
    params = _parameters(doc.get("parameters"), "parameters", problems)
    tensors = _tensors(doc.get("inputs"), "input", problems)
    _check_inputs(tensors, spec, problems)
    outputs = _requested_outputs(doc.get("outputs"), params, spec, problems)
    if not problems:
        _check_binary_layout(tensors, len(rest), header_length is not None, problems)
    _raise_if(problems, f"invalid infer request for {spec.name!r}")
    return InferRequest(_decode_tensors(tensors, rest), outputs, request_id, params)


def encode_infer_request(inputs: Mapping[str, torch.Tensor], *, binary_inputs: bool = False,
                         outputs: Sequence[str] | None = None, binary_outputs: bool = False,
                         request_id: str | None = None, parameters: dict[str, Any] | None = None) -> EncodedBody:
    """The client side (tests, benchmarks, the CLI): a request body for ``inputs``."""
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    params = dict(parameters or {})
    if binary_outputs and outputs is None:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    entries, blobs, finite = _encode_tensors(inputs.items(), binary_inputs)
    doc["inputs"] = entries
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    return _join(doc, blobs, finite)


# -- responses ----------------------------------------------------------------------------------------------


def encode_infer_response(model_name: str, model_version: str, outputs: Mapping[str, torch.Tensor],
                          requested: Sequence[OutputRequest], request_id: str | None = None,
                          parameters: dict[str, Any] | None = None) -> EncodedBody:
    """The response body holding the ``requested`` outputs, binary where asked."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    missing = [r.name for r in requested if r.name not in outputs]
    if missing:  # the node broke its contract: a server error (500), not the client's
        raise RuntimeError(f"the node returned no output {missing} for {model_name!r} (it returned {list(outputs)})")
    entries: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    finite = True
    for r in requested:
        (entry,), blob, fin = _encode_tensors([(r.name, outputs[r.name])], r.binary)
        entries.append(entry)
        blobs += blob
        finite = finite and fin
    doc["outputs"] = entries
    return _join(doc, blobs, finite)


def decode_infer_response(body: bytes, header_length: str | int | None = None) -> tuple[dict[str, Any],
                                                                                         dict[str, torch.Tensor]]:
    """The client side: the response document (outputs' data removed) and its outputs as tensors."""
    doc, rest = _split(body, header_length)
    problems: list[str] = []
    tensors = _tensors(doc.get("outputs"), "output", problems, allow_empty=True)
    if not problems:
        _check_binary_layout(tensors, len(rest), header_length is not None, problems)
    _raise_if(problems, "invalid infer response")
    out = _decode_tensors(tensors, rest)
    doc = dict(doc)
    doc["outputs"] = [{k: v for k, v in o.items() if k != "data"} for o in doc.get("outputs") or []]
    return doc, out


# -- parsing ------------------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise InvalidInputError(message)


def _raise_if(problems: list[str], prefix: str) -> None:
    if problems:
        more = f"; and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
        _fail(f"{prefix}: " + "; ".join(problems[:_MAX_PROBLEMS]) + more)


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, (list, dict, str, bytes)) and len(value) > limit:  # don't repr 64 MiB to show 60 chars
        return f"a {type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split(body: bytes | memoryview, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header as an object, and the binary bytes after it."""
    if header_length is None:
        n = len(body)
    elif isinstance(header_length, int):
        n = header_length
    elif re.fullmatch(r"[0-9]{1,19}", header_length.strip()):
        n = int(header_length.strip())
    else:
        _fail(f"{HEADER_LENGTH} must be a non-negative integer, not {_short(header_length)}")
    if header_length is not None:
        if n <= 0:
            _fail(f"{HEADER_LENGTH} must be positive: the JSON header cannot be empty")
        if n > len(body):
            _fail(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
    if n == 0:
        _fail("malformed JSON: the body is empty")
    try:
        doc = jsonio.loads(body[:n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = "JSON header" if header_length is not None else "JSON"
        _fail(f"malformed {where}: {e}")
    if not isinstance(doc, dict):
        _fail(f"the body must be a JSON object, not {type(doc).__name__}")
    return doc, memoryview(body)[n:]


def _parameters(raw: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object, not {_short(raw)}")
        return {}
    return raw


def _tensors(raw: Any, kind: str, problems: list[str], allow_empty: bool = False) -> list[_Tensor]:
    if not isinstance(raw, list) or (not raw and not allow_empty):
        problems.append(f"{kind}s: required, a non-empty list of tensors")
        return []
    return [t for i, r in enumerate(raw) if (t := _tensor(r, f"{kind}s[{i}]", kind, problems)) is not None]


def _tensor(raw: Any, index: str, kind: str, problems: list[str]) -> _Tensor | None:
    if not isinstance(raw, dict):
        problems.append(f"{index}: must be an object with name, shape, datatype and data")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{index}.name: required, a non-empty string")
        return None
    t = _Tensor(name, kind)
    n_before = len(problems)
    datatype = raw.get("datatype")
    if datatype == "BYTES":
        problems.append(f"{t.where}: datatype BYTES (strings) is not supported; swapserve serves numeric tensors "
                        f"({', '.join(DATATYPES)})")
    elif datatype not in DATATYPES:
        problems.append(f"{t.where}: unknown datatype {_short(datatype)} (one of {', '.join(DATATYPES)})")
    else:
        t.datatype = datatype
    shape = raw.get("shape")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        problems.append(f"{t.where}: shape must be a list of non-negative integers, not {_short(shape)}")
    else:
        t.shape = tuple(shape)
    params = _parameters(raw["parameters"], f"{t.where}.parameters", problems) if "parameters" in raw else {}
    size = params.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        problems.append(f"{t.where}: parameters.binary_data_size must be a non-negative integer, not {_short(size)}")
        size = None
    has_data = "data" in raw
    if has_data and size is not None:
        problems.append(f"{t.where}: give either data or parameters.binary_data_size, not both")
    elif not has_data and size is None and "binary_data_size" not in params:
        problems.append(f"{t.where}: no data (give data, or parameters.binary_data_size with the binary extension)")
    t.data, t.binary_size = raw.get("data"), size
    t.valid = len(problems) == n_before
    return t


def _check_inputs(tensors: list[_Tensor], spec: FunctionSpec, problems: list[str]) -> None:
    """Names, datatypes and shapes against the declaration; one batch size for every input."""
    decls = {d.name: d for d in spec.inputs}
    seen: set[str] = set()
    batch: tuple[int, str] | None = None
    for t in tensors:
        if t.name in seen:
            problems.append(f"input {t.name!r} appears more than once")
            continue
        seen.add(t.name)
        d = decls.get(t.name)
        if d is None:
            problems.append(f"input {t.name!r} is not an input of {spec.name!r} (its inputs: {', '.join(decls)})")
            continue
        if not t.valid:
            continue
        if t.datatype != d.datatype:
            problems.append(f"input {t.name!r}: datatype {t.datatype}, but {spec.name!r} declares {d.datatype}")
        if len(t.shape) != len(d.shape) or any(dd != td and not (dd == -1 and td >= 1)
                                               for dd, td in zip(d.shape, t.shape)):
            problems.append(f"input {t.name!r}: shape {list(t.shape)} does not match the declared "
                            f"{list(d.shape)} (-1: any batch size >= 1)")
        elif d.shape and d.shape[0] == -1:
            if batch is None:
                batch = (t.shape[0], t.name)
            elif t.shape[0] != batch[0]:
                problems.append(f"input {t.name!r} has batch size {t.shape[0]} but input {batch[1]!r} has "
                                f"{batch[0]}: all inputs must have the same batch size")
    missing = [n for n in decls if n not in seen]
    if missing:
        problems.append(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                        f"of {spec.name!r}")
    if batch is not None and batch[0] > spec.max_batch:
        problems.append(f"batch size {batch[0]} exceeds {spec.name!r}'s max_batch ({spec.max_batch})")


def _requested_outputs(raw: Any, params: dict[str, Any], spec: FunctionSpec,
                       problems: list[str]) -> tuple[OutputRequest, ...]:
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        problems.append(f"parameters.binary_data_output: must be true or false, not {_short(default)}")
        default = False
    if raw is None or raw == []:  # KServe: no outputs named → every output
        return tuple(OutputRequest(o.name, default) for o in spec.outputs)
    if not isinstance(raw, list):
        problems.append(f"outputs: must be a list of {{name, parameters}}, not {_short(raw)}")
        return ()
    declared = [o.name for o in spec.outputs]
    found: list[OutputRequest] = []
    for i, r in enumerate(raw):
        name = r.get("name") if isinstance(r, dict) else None
        if not isinstance(name, str):
            problems.append(f"outputs[{i}]: must be an object with a string name")
            continue
        if name not in declared:
            problems.append(f"output {name!r} is not an output of {spec.name!r} (its outputs: {', '.join(declared)})")
            continue
        if any(f.name == name for f in found):
            problems.append(f"output {name!r} is requested more than once")
            continue
        p = _parameters(r.get("parameters"), f"output {name!r}.parameters", problems)
        if "classification" in p:
            problems.append(f"output {name!r}: the classification extension is not supported")
        binary = p.get("binary_data", default)
        if not isinstance(binary, bool):
            problems.append(f"output {name!r}: parameters.binary_data must be true or false")
            binary = default
        found.append(OutputRequest(name, binary))
    return tuple(found)


def _check_binary_layout(tensors: list[_Tensor], available: int, has_header: bool, problems: list[str]) -> None:
    """Each binary tensor's size matches its shape, and the sizes add up to exactly the bytes that follow."""
    binary = [t for t in tensors if t.binary_size is not None]
    if binary and not has_header:
        problems.append(f"{binary[0].where} has parameters.binary_data_size but the request has no "
                        f"{HEADER_LENGTH} header")
        return
    for t in binary:
        need = t.numel * element_size(t.datatype)
        if t.binary_size != need:
            problems.append(f"{t.where}: binary_data_size is {t.binary_size} but shape {list(t.shape)} of "
                            f"{t.datatype} needs {need} bytes")
    total = sum(t.binary_size or 0 for t in binary)
    if total != available:
        problems.append(f"the binary tensors declare {total} bytes but {available} bytes follow the JSON header")


def _decode_tensors(tensors: list[_Tensor], rest: memoryview) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for t in tensors:
        if t.binary_size is not None:
            out[t.name] = _from_bytes(t, rest[offset: offset + t.binary_size])
            offset += t.binary_size
        else:
            out[t.name] = _from_json(t)
    return out


def _from_json(t: _Tensor) -> torch.Tensor:
    if not isinstance(t.data, list):
        _fail(f"{t.where}: data must be a list (flat in row-major order, or nested to the shape), "
              f"not {_short(t.data)}")
    try:
        arr = np.asarray(t.data)
    except (ValueError, TypeError):  # numpy refuses ragged nesting
        _fail(f"{t.where}: data is ragged: nested lists must have equal lengths")
    n = t.numel
    if arr.ndim > 1 and arr.shape != t.shape:
        _fail(f"{t.where}: data is nested as {list(arr.shape)} but the shape is {list(t.shape)}")
    if arr.size != n:
        _fail(f"{t.where}: shape {list(t.shape)} holds {n} elements but data has {arr.size}")
    dtype = torch_dtype(t.datatype)
    if n == 0:
        return torch.empty(t.shape, dtype=dtype)
    kind_ok, want = _DATA_KINDS[t.datatype]
    if arr.dtype.kind not in kind_ok:
        too_big = t.datatype in _INTS and _beyond_int64(arr)
        _fail(f"{t.where}: {t.datatype} data must be {want}"
              + (f" within the range of {t.datatype}" if too_big else ""))
    if t.datatype in _INTS:
        info = np.iinfo(numpy_dtype(t.datatype))
        if arr.min() < info.min or arr.max() > info.max:
            _fail(f"{t.where}: {t.datatype} data must lie in [{info.min}, {info.max}]")
    if t.datatype == "BF16":  # numpy has no bfloat16: round through fp32 in torch
        with np.errstate(over="ignore", invalid="ignore"):
            return torch.from_numpy(arr.astype(np.float32).reshape(t.shape)).to(torch.bfloat16)
    want_dtype = numpy_dtype(t.datatype)
    if arr.dtype != want_dtype:
        if want_dtype.kind == "f":  # numbers beyond its range become inf, as in a cast
            with np.errstate(over="ignore", invalid="ignore"):
                arr = arr.astype(want_dtype)
        else:  # integers: their range is checked above
            arr = arr.astype(want_dtype)
    # np.asarray of a list and astype give a new contiguous array: its reshape is a view (numpy's reshape
    # costs a fifteenth of torch's).
    return torch.from_numpy(arr.reshape(t.shape))


def _beyond_int64(arr: np.ndarray) -> bool:
    """Integers too large for any integer datatype: Python ints (``json``) or integral floats of 2**63 or more
    (orjson reads integers beyond 64 bits as floats)."""
    if arr.dtype.kind == "O":
        return all(isinstance(v, int) for v in arr.flat)
    return arr.dtype.kind == "f" and bool(np.all(np.mod(arr, 1) == 0)) and bool(np.any(np.abs(arr) >= 2.0**63))


def _from_bytes(t: _Tensor, raw: memoryview) -> torch.Tensor:
    # Raw bytes are little-endian per the protocol, as is every host we run on (x86-64, aarch64).
    dtype = torch_dtype(t.datatype)
    if len(raw) == 0:
        return torch.empty(t.shape, dtype=dtype)
    # torch.frombuffer wants writable memory (it warns on read-only bytes): a writable body's own bytes, else
    # one copy — also where the bytes do not start at a multiple of their element size. Either way the tensor
    # keeps its memory alive.
    x = torch.frombuffer(bytearray(raw) if raw.readonly else raw, dtype=torch.uint8 if t.datatype == "BOOL" else dtype)
    if x.data_ptr() % x.element_size():
        x = x.clone()
    if t.datatype == "BOOL":
        if int(x.max()) > 1:
            _fail(f"{t.where}: BOOL bytes must be 0 or 1")
        x = x.view(torch.bool)
    return x.reshape(t.shape)


# -- encoding -----------------------------------------------------------------------------------------------


def _encode_tensors(items: Any, binary: bool) -> tuple[list[dict[str, Any]], list[memoryview], bool]:
    """The tensors' entries, their bytes where binary, and whether every float written as JSON is finite."""
    entries: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    finite = True
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}
        flat = t.reshape(-1)
        if binary:
            blob = memoryview(flat.view(torch.uint8).numpy())  # the tensor's own bytes (it stays alive with the view)
            entry["parameters"] = {"binary_data_size": blob.nbytes}
            blobs.append(blob)
        else:
            # fp16/bf16 → fp32 is exact, and JSON floats parse back to the same half-precision values.
            entry["data"] = data = (flat.float() if t.dtype in (torch.float16, torch.bfloat16) else flat).tolist()
            if t.is_floating_point() and not math.isfinite(sum(data)):  # ~10× cheaper than torch's isfinite here;
                finite = False  # a sum that overflows only sends the answer the slower way
        entries.append(entry)
    return entries, blobs, finite


def _join(doc: dict[str, Any], blobs: list[memoryview], finite: bool) -> EncodedBody:
    header = jsonio.dumps(doc, finite=finite)
    if not blobs:
        return EncodedBody((header,), None)
    return EncodedBody((header, *blobs), len(header))


__all__ = ["BINARY_CONTENT_TYPE", "HEADER_LENGTH", "JSON_CONTENT_TYPE", "EncodedBody", "InferRequest",
           "OutputRequest", "decode_infer_request", "decode_infer_response", "encode_infer_request",
           "encode_infer_response"]
