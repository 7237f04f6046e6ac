"""The OIP v2 codec alone: JSON and binary round trips for every datatype, and every malformed request."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from swapserve.errors import InvalidInputError
from swapserve.functions.spec import FunctionSpec
from swapserve.gateway import oip
from swapserve.gateway.oip import OutputRequest
from swapserve.tensors import DATATYPES, torch_dtype


def make_spec(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]] | None = None,
              max_batch: int = 8) -> FunctionSpec:
    return FunctionSpec.from_dict({
        "name": "fn", "model": {"zoo": "mlp"}, "slo_ms": 100, "max_batch": max_batch,
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs or [("y", "FP32", [-1, 2])]]})


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(datatype)
    if datatype == "BOOL":
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**40)), min(info.max, 2**40)
    t = torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)
    if datatype == "INT64":  # values beyond 2**53 too, which a float detour would corrupt
        t[0, 0] = 2**62 + 1
    return t


def decode(enc: oip.EncodedBody, spec: FunctionSpec) -> oip.InferRequest:
    return oip.decode_infer_request(enc.body, spec, None if enc.header_length is None else str(enc.header_length))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    spec = make_spec([("x", datatype, [-1, 3, 2])])
    x = sample(datatype, (4, 3, 2))
    enc = oip.encode_infer_request({"x": x}, binary_inputs=binary, request_id="r-1")
    assert (enc.header_length is not None) == binary
    req = decode(enc, spec)
    assert req.id == "r-1"
    assert req.inputs["x"].dtype == x.dtype and req.inputs["x"].shape == x.shape
    assert torch.equal(req.inputs["x"], x)
    assert req.outputs == (OutputRequest("y", False),)


def test_mixed_request_binary_and_json_inputs_in_order() -> None:
    spec = make_spec([("a", "FP16", [-1, 2]), ("b", "BF16", [-1, 2]), ("c", "INT64", [-1]), ("d", "BOOL", [-1, 2])])
    tensors = {"a": sample("FP16", (3, 2)), "b": sample("BF16", (3, 2), 1), "c": torch.tensor([-(2**63), 0, 2**63 - 1]),
               "d": sample("BOOL", (3, 2), 2)}
    # a and d binary, b and c JSON: binary bytes follow in input order, skipping the JSON ones.
    blobs = [oip.encode_infer_request({k: tensors[k]}, binary_inputs=True) for k in "ad"]
    entries = []
    for k in "abcd":
        if k in "ad":
            blob = blobs["ad".index(k)]
            entries.append(json.loads(blob.body[: blob.header_length])["inputs"][0])
        else:
            entries.append(json.loads(oip.encode_infer_request({k: tensors[k]}).body)["inputs"][0])
    header = json.dumps({"inputs": entries}).encode()
    body = header + b"".join(b.body[b.header_length:] for b in blobs)
    req = oip.decode_infer_request(body, spec, str(len(header)))
    assert list(req.inputs) == list("abcd")
    for k, t in tensors.items():
        assert torch.equal(req.inputs[k], t), k


def test_nested_data_and_bf16_json_floats() -> None:
    spec = make_spec([("x", "BF16", [-1, 2]), ("n", "INT32", [-1, 2])])
    body = json.dumps({"inputs": [
        {"name": "x", "datatype": "BF16", "shape": [2, 2], "data": [[1.0, 0.1], [-2.5, 3]]},
        {"name": "n", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}).encode()
    req = oip.decode_infer_request(body, spec)
    assert torch.equal(req.inputs["x"], torch.tensor([[1.0, 0.1], [-2.5, 3.0]]).bfloat16())
    assert torch.equal(req.inputs["n"], torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))


def test_requested_outputs_and_binary_flags() -> None:
    spec = make_spec([("x", "FP32", [-1, 2])], [("y", "FP32", [-1, 2]), ("z", "INT64", [-1])])
    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    req = oip.decode_infer_request(json.dumps(x | {"parameters": {"binary_data_output": True}}).encode(), spec)
    assert req.outputs == (OutputRequest("y", True), OutputRequest("z", True))
    doc = x | {"parameters": {"binary_data_output": True},
               "outputs": [{"name": "z"}, {"name": "y", "parameters": {"binary_data": False}}]}
    req = oip.decode_infer_request(json.dumps(doc).encode(), spec)
    assert req.outputs == (OutputRequest("z", True), OutputRequest("y", False))  # request order, per-output wins


@pytest.mark.parametrize("mode", ["json", "binary", "mixed"])
def test_response_round_trip(mode: str) -> None:
    outs = {"logits": sample("FP32", (2, 5)), "half": sample("FP16", (2, 3), 1), "bf": sample("BF16", (2, 3), 2),
            "ids": sample("INT64", (2, 4), 3), "mask": sample("BOOL", (2, 2), 4)}
    requested = [OutputRequest(n, mode == "binary" or (mode == "mixed" and i % 2 == 0)) for i, n in enumerate(outs)]
    enc = oip.encode_infer_response("fn", "3", outs, requested, request_id="abc", parameters={"device": "cpu"})
    assert (enc.header_length is None) == (mode == "json")
    assert enc.content_type == ("application/json" if mode == "json" else "application/octet-stream")
    doc, got = oip.decode_infer_response(enc.body, enc.header_length)
    assert doc["model_name"] == "fn" and doc["model_version"] == "3" and doc["id"] == "abc"
    assert doc["parameters"] == {"device": "cpu"}
    assert [o["name"] for o in doc["outputs"]] == list(outs)
    for name, t in outs.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_response_only_requested_outputs_and_missing_output_is_a_server_error() -> None:
    outs = {"a": torch.ones(1, 2), "b": torch.zeros(1)}
    enc = oip.encode_infer_response("fn", "1", outs, [OutputRequest("b", False)])
    assert [o["name"] for o in json.loads(enc.body)["outputs"]] == ["b"]
    with pytest.raises(RuntimeError, match="no output"):
        oip.encode_infer_response("fn", "1", outs, [OutputRequest("c", False)])


SPEC = make_spec([("x", "FP32", [-1, 2]), ("m", "INT64", [-1])], [("y", "FP32", [-1, 2])], max_batch=4)


def _x(**kw: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]} | kw


def _m(**kw: Any) -> dict[str, Any]:
    return {"name": "m", "datatype": "INT64", "shape": [2], "data": [5, 6]} | kw


def _body(*inputs: dict[str, Any], **doc: Any) -> bytes:
    return json.dumps({"inputs": list(inputs)} | doc).encode()


X_BYTES = torch.arange(4, dtype=torch.float32).numpy().tobytes()


def _binary(header: dict[str, Any], payload: bytes) -> tuple[bytes, str]:
    h = json.dumps(header).encode()
    return h + payload, str(len(h))


_BIN_X = _x(parameters={"binary_data_size": 16})
del _BIN_X["data"]

MALFORMED: list[tuple[str, bytes, str | None, str]] = [
    ("empty body", b"", None, "body is empty"),
    ("not json", b"{inputs: [", None, "malformed JSON"),
    ("not utf-8", b"\xff\xfe{", None, "malformed JSON"),
    ("not an object", b"[1, 2]", None, "must be a JSON object"),
    ("deep nesting", b"[" * 100_000, None, "malformed JSON"),
    ("no inputs", b"{}", None, "inputs: required"),
    ("inputs not a list", _body().replace(b"[]", b"{}"), None, "inputs: required"),
    ("input not an object", json.dumps({"inputs": [3, _m()]}).encode(), None, "inputs[0]: must be an object"),
    ("input without name", _body({"datatype": "FP32", "shape": [1], "data": [1]}), None, "inputs[0].name"),
    ("header length not an integer", b'{"inputs": []}', "12x", "must be a non-negative integer"),
    ("header length negative", b'{"inputs": []}', "-3", "must be a non-negative integer"),
    ("header length zero", b'{"inputs": []}', "0", "must be positive"),
    ("header length beyond the body", b'{"inputs": []}', "99", "body has only 14 bytes"),
    ("header cut inside the JSON", b'{"inputs": []}', "5", "malformed JSON header"),
    ("binary sizes short", *_binary({"inputs": [_BIN_X, _m()]}, X_BYTES[:-4]), "16 bytes but 12 bytes follow"),
    ("binary sizes long", *_binary({"inputs": [_BIN_X, _m()]}, X_BYTES + b"\0"), "16 bytes but 17 bytes follow"),
    ("data and binary size both", *_binary({"inputs": [_x(parameters={"binary_data_size": 16}), _m()]}, X_BYTES),
     "give either data or parameters.binary_data_size, not both"),
    ("binary size wrong for shape",
     *_binary({"inputs": [{k: v for k, v in _x(parameters={"binary_data_size": 12}).items() if k != "data"}, _m()]},
              X_BYTES[:12]), "binary_data_size is 12 but shape [2, 2] of FP32 needs 16 bytes"),
    ("binary size without header", _body(_BIN_X, _m()), None, "no Inference-Header-Content-Length"),
    ("binary size negative", *_binary({"inputs": [_x(parameters={"binary_data_size": -1}), _m()]}, b""),
     "binary_data_size must be a non-negative integer"),
    ("no data", _body({k: v for k, v in _x().items() if k != "data"}, _m()), None, "no data"),
    ("shape vs element count", _body(_x(data=[1, 2, 3]), _m()), None, "holds 4 elements but data has 3"),
    ("nested vs shape", _body(_x(data=[[1, 2, 3, 4]]), _m()), None, "nested as [1, 4] but the shape is [2, 2]"),
    ("ragged", _body(_x(data=[[1, 2], [3]]), _m()), None, "ragged"),
    ("data not a list", _body(_x(data=3), _m()), None, "data must be a list"),
    ("strings in FP32", _body(_x(data=["1", 2, 3, 4]), _m()), None, "FP32 data must be numbers"),
    ("floats in INT64", _body(_x(), _m(data=[1.5, 2])), None, "INT64 data must be integers"),
    ("bools in FP32", _body(_x(data=[True, False, True, False]), _m()), None, "FP32 data must be numbers"),
    ("INT64 overflow", _body(_x(), _m(data=[2**64, 1])), None, "within the range of INT64"),
    ("nulls", _body(_x(data=[None, 1, 2, 3]), _m()), None, "FP32 data must be numbers"),
    ("unknown datatype", _body(_x(datatype="FP8"), _m()), None, "unknown datatype 'FP8'"),
    ("BYTES", _body(_x(datatype="BYTES"), _m()), None, "BYTES (strings) is not supported"),
    ("bad shape", _body(_x(shape=[2, -1]), _m()), None, "shape must be a list of non-negative integers"),
    ("shape not a list", _body(_x(shape="2x2"), _m()), None, "shape must be a list"),
    ("missing input", _body(_x()), None, "missing input 'm'"),
    ("unknown input", _body(_x(), _m(), _x(name="z")), None, "input 'z' is not an input of 'fn' (its inputs: x, m)"),
    ("duplicate input", _body(_x(), _m(), _x()), None, "input 'x' appears more than once"),
    ("wrong datatype", _body(_x(datatype="FP16"), _m()), None, "datatype FP16, but 'fn' declares FP32"),
    ("wrong rank", _body(_x(shape=[4], data=[1, 2, 3, 4]), _m()), None, "shape [4] does not match the declared"),
    ("wrong inner dim", _body(_x(shape=[1, 4]), _m(shape=[1], data=[1])), None, "shape [1, 4] does not match"),
    ("zero batch", _body(_x(shape=[0, 2], data=[]), _m(shape=[0], data=[])), None, "shape [0, 2] does not match"),
    ("batches disagree", _body(_x(), _m(shape=[3], data=[1, 2, 3])), None, "all inputs must have the same batch"),
    ("batch beyond max_batch", _body(_x(shape=[5, 2], data=list(range(10))), _m(shape=[5], data=[1] * 5)), None,
     "batch size 5 exceeds 'fn''s max_batch (4)"),
    ("unknown output", _body(_x(), _m(), outputs=[{"name": "nope"}]), None, "output 'nope' is not an output"),
    ("duplicate output", _body(_x(), _m(), outputs=[{"name": "y"}, {"name": "y"}]), None, "requested more than once"),
    ("outputs not a list", _body(_x(), _m(), outputs={"name": "y"}), None, "outputs: must be a list"),
    ("binary_data not bool", _body(_x(), _m(), outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]), None,
     "binary_data must be true or false"),
    ("classification", _body(_x(), _m(), outputs=[{"name": "y", "parameters": {"classification": 3}}]), None,
     "classification extension is not supported"),
    ("id not a string", _body(_x(), _m(), id=7), None, "id: must be a string"),
    ("parameters not an object", _body(_x(), _m(), parameters=[1]), None, "parameters: must be an object"),
]


@pytest.mark.parametrize("body, header_length, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_400_with_a_clear_message(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        oip.decode_infer_request(body, SPEC, header_length)
    assert info.value.http_status == 400
    assert message in str(info.value)


def test_binary_bool_must_be_0_or_1() -> None:
    spec = make_spec([("b", "BOOL", [-1, 2])])
    body, n = _binary({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [1, 2],
                                   "parameters": {"binary_data_size": 2}}]}, b"\x01\x07")
    with pytest.raises(InvalidInputError, match="BOOL bytes must be 0 or 1"):
        oip.decode_infer_request(body, spec, n)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(InvalidInputError) as info:
        oip.decode_infer_request(_body(_x(datatype="FP16"), _x(name="q")), SPEC)
    text = str(info.value)
    assert "datatype FP16" in text and "'q' is not an input" in text and "missing input 'm'" in text


def test_decoded_tensors_own_their_memory() -> None:
    spec = make_spec([("x", "FP32", [-1, 2])])
    body, n = _binary({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 16}}]}, X_BYTES)
    x = oip.decode_infer_request(body, spec, n).inputs["x"]
    x += 1  # writable, and independent of the request body
    assert body.endswith(X_BYTES)
    assert torch.equal(x, torch.arange(4, dtype=torch.float32).reshape(2, 2) + 1)


@pytest.mark.parametrize("pad", [0, 1], ids=["aligned", "misaligned"])
def test_a_writable_body_lends_its_bytes_to_aligned_tensors(pad: int) -> None:
    # The fast path hands a request's own buffer over (a bytearray, as a view): its binary tensors are decoded
    # in place, no copy, unless their bytes do not start at a multiple of the element size.
    spec = make_spec([("x", "FP32", [-1, 2])])
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    header += b" " * ((-len(header)) % 4 + pad)  # JSON may end in blanks: the tensor starts where we want
    buf = bytearray(b"junk" + header + X_BYTES + b"tail")
    body = memoryview(buf)[4:-4]
    x = oip.decode_infer_request(body, spec, len(header)).inputs["x"]
    assert torch.equal(x, torch.arange(4, dtype=torch.float32).reshape(2, 2))
    assert (x.data_ptr() % 4 == 0)
    buf[4 + len(header)] ^= 0xFF  # the first byte of the tensor's bytes in the body
    assert torch.equal(x, torch.arange(4, dtype=torch.float32).reshape(2, 2)) == bool(pad)


def test_fp16_json_overflow_becomes_inf_like_a_cast() -> None:
    spec = make_spec([("x", "FP16", [-1, 2])])
    req = oip.decode_infer_request(_body({"name": "x", "datatype": "FP16", "shape": [1, 2], "data": [1e6, 1]}), spec)
    assert torch.isinf(req.inputs["x"][0, 0]) and req.inputs["x"][0, 1] == 1


@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_non_finite_json_floats_round_trip_as_python_writes_them(datatype: str) -> None:
    # Python clients write NaN and Infinity (not JSON, but Python's json reads them); orjson refuses them, so the
    # codec reads them with json, and writes them as json does, not as orjson's null.
    x = torch.tensor([[float("nan"), float("inf")], [-float("inf"), 1.5]]).to(torch_dtype(datatype))
    body = oip.encode_infer_request({"x": x}).body
    assert b"NaN" in body and b"-Infinity" in body
    got = oip.decode_infer_request(body, make_spec([("x", datatype, [-1, 2])])).inputs["x"]
    assert got.dtype == x.dtype and torch.equal(got.isnan(), x.isnan()) and torch.equal(got.nan_to_num(), x.nan_to_num())
    answer = oip.encode_infer_response("fn", "1", {"y": x}, [OutputRequest("y", False)]).body
    assert b"NaN" in answer and b"null" not in answer
    _, outs = oip.decode_infer_response(answer)
    assert torch.equal(outs["y"].isnan(), x.isnan()) and torch.equal(outs["y"].nan_to_num(), x.nan_to_num())


def test_finite_answers_are_the_json_python_reads_back() -> None:
    y = sample("FP32", (3, 5))
    answer = oip.encode_infer_response("fn", "1", {"y": y, "z": torch.arange(4)},
                                       [OutputRequest("y", False), OutputRequest("z", False)], "id-1",
                                       {"compute_ms": 0.1234567891234, "swapped": True, "lane": 1}).body
    doc = json.loads(answer)
    assert doc["outputs"][0]["data"] == y.reshape(-1).tolist() and doc["outputs"][1]["data"] == [0, 1, 2, 3]
    assert doc["parameters"] == {"compute_ms": 0.1234567891234, "swapped": True, "lane": 1} and doc["id"] == "id-1"
