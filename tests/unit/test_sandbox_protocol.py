"""The sandbox wire, without processes: what the parent accepts from a sandbox, the arena, model-handle
input checks."""

from __future__ import annotations

import os

import msgpack
import pytest
import torch

from swapserve.errors import PayloadTooLargeError
from swapserve.functions.spec import TensorDecl
from swapserve.sandbox.api import ModelFuture, ModelHandle, ModelInputError
from swapserve.sandbox.protocol import (ALIGN, Arena, Call, Failure, Hello, ProtocolViolation, Response, check_json,
                                        decode_tensors, encode_tensors, parse_child_message, unpack)

ARENA = 1 << 20
HALF = ARENA // 2


@pytest.fixture
def arena() -> Arena:
    a = Arena.create(ARENA)
    yield a
    a.close()


def test_arena_is_sealed_against_resizing(arena: Arena) -> None:
    """A sandbox that shrank its arena would make the parent's next read fault (SIGBUS)."""
    for size in (0, ARENA * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(arena.fd, size)
    assert os.fstat(arena.fd).st_size == ARENA


def test_arena_round_trip_and_halves(arena: Arena) -> None:
    x, i = torch.randn(3, 5), torch.arange(7, dtype=torch.int64)
    down = arena.parent_side()
    refs = down.write({"x": x, "i": i}, "test tensors")
    assert all(lo % ALIGN == 0 and lo < HALF for _, _, _, lo in refs)
    back = arena.read(decode_tensors(encode_tensors(refs), 0, HALF))
    torch.testing.assert_close(back["x"], x)
    torch.testing.assert_close(back["i"], i)
    up = arena.child_side()
    (ref,) = up.write({"y": torch.ones(4)}, "test")
    assert ref[3] >= HALF
    with pytest.raises(PayloadTooLargeError):
        up.write({"big": torch.zeros(HALF, dtype=torch.uint8)}, "the response's tensors")
    down.reset()
    assert down.write({"x": x}, "again")[0][3] == 0


def test_a_tensor_already_in_the_arena_is_named_where_it_lies(arena: Arena) -> None:
    """A handler passing on what the pool wrote (a request input to a model, a model's output as its response)
    sends a reference, not a copy; anything else (its own tensors, unaligned or strided views) is written."""
    down, up = arena.parent_side(), arena.child_side()
    (ref,) = down.write({"x": torch.randn(4, 16)}, "test")
    x = arena.read([ref], copy=False)["x"]
    own = torch.randn(4, 16)
    refs = up.place({"a": x, "b": own, "c": x[:, 1:], "d": x.view(-1)[16:]}, "test")
    by = {r[0]: r for r in refs}
    assert by["a"][3] == ref[3]  # the pool's own bytes, named where they are
    assert by["d"][3] == ref[3] + 16 * 4 and by["d"][2] == (48,)  # 64-byte aligned: named too
    assert by["b"][3] >= HALF and by["c"][3] >= HALF  # copied into the sandbox's half
    back = arena.read(decode_tensors(encode_tensors(refs), 0, ARENA))
    torch.testing.assert_close(back["a"], x)
    torch.testing.assert_close(back["b"], own)
    torch.testing.assert_close(back["c"], x[:, 1:])
    torch.testing.assert_close(back["d"], x.view(-1)[16:])
    assert arena.offset_of(torch.randn(3)) is None and arena.offset_of(x[:, ::2]) is None


@pytest.mark.parametrize("raw,why", [
    ([["x", "float32", [32], HALF - 64]], "outside"),          # starts in the parent's half
    ([["x", "float32", [4], 0]], "outside"),                   # the parent's half
    ([["x", "float32", [1 << 20], HALF]], "outside"),          # longer than the arena
    ([["x", "float32", [4], HALF + 4]], "offset"),             # unaligned
    ([["x", "complex64", [4], HALF]], "unsupported dtype"),
    ([["x", "float32", [-1], HALF]], "shape"),
    ([["x", "float32", [2.0], HALF]], "shape"),
    ([["x", "float32", [1], HALF], ["x", "float32", [1], HALF + 64]], "repeated"),
    ([["x", "float32", [1]]], "reference"),
    ("x", "list"),
])
def test_tensor_references_from_a_sandbox_are_checked(raw: object, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        decode_tensors(raw, HALF, ARENA)


def test_valid_messages_parse() -> None:
    call = parse_child_message({"t": "call", "req": 1, "id": 2, "model": "m", "inputs": [["x", "float32", [2, 3], HALF]]},
                               HALF, ARENA)
    assert call == Call(1, 2, "m", [("x", "float32", (2, 3), HALF)])
    resp = parse_child_message({"t": "resp", "req": 1, "is_json": True, "json": {"a": [1, 2.5, None]}, "params": {}},
                               HALF, ARENA)
    assert isinstance(resp, Response) and resp.json == {"a": [1, 2.5, None]}
    fail = parse_child_message({"t": "fail", "req": 1, "kind": "handler", "message": "x" * 100_000, "detail": "",
                                "call": None}, HALF, ARENA)
    assert isinstance(fail, Failure) and len(fail.message) < 70_000
    hello = parse_child_message({"t": "hello", "pid": 1, "isolation": {"landlock_abi": 7}, "timings": {"import": 1}},
                                HALF, ARENA)
    assert isinstance(hello, Hello) and hello.timings == {"import": 1.0}


@pytest.mark.parametrize("msg", [
    {"t": "exec", "code": "print(1)"},
    {"req": 1},
    [1, 2],
    {"t": "call", "req": -1, "id": 1, "model": "m", "inputs": []},
    {"t": "call", "req": 1, "id": True, "model": "m", "inputs": []},
    {"t": "resp", "req": 1, "is_json": "yes"},
    {"t": "resp", "req": 1, "is_json": True, "json": float("nan")},
    {"t": "resp", "req": 1, "is_json": True, "json": b"bytes"},
    {"t": "resp", "req": 1, "is_json": True, "json": {1: "int key"}},
    {"t": "resp", "req": 1, "is_json": False, "tensors": [["y", "float32", [4], 0]]},
    {"t": "fail", "req": 1, "kind": "reboot", "message": ""},
    {"t": "loadfail", "stage": "anything", "message": ""},
])
def test_invalid_messages_are_violations(msg: object) -> None:
    with pytest.raises(ProtocolViolation):
        parse_child_message(msg, HALF, ARENA)


def test_decoding_refuses_extension_types_and_deep_nesting() -> None:
    with pytest.raises(ProtocolViolation, match="extension"):
        unpack(msgpack.packb(msgpack.ExtType(5, b"\x00")))
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    with pytest.raises(ProtocolViolation, match="deeper"):
        check_json(deep)
    check_json({"ok": [1, "two", 3.0, True, None, {"n": 0}]})


def test_model_handle_checks_inputs_before_sending() -> None:
    sent: list[tuple[str, dict[str, torch.Tensor]]] = []

    class Transport:
        def submit(self, model: str, inputs: dict[str, torch.Tensor]) -> ModelFuture:
            sent.append((model, inputs))
            return ModelFuture(model, len(sent))

    h = ModelHandle("enc", (TensorDecl("ids", "INT64", (-1, 8)), TensorDecl("mask", "INT64", (-1, 8))), (), 4, Transport())
    ids = torch.zeros(2, 8, dtype=torch.int64)
    h({"ids": ids}, mask=ids)
    assert sent[-1][0] == "enc" and set(sent[-1][1]) == {"ids", "mask"}
    for bad, match in [
        (lambda: h(ids), "takes 2 inputs"),
        (lambda: h({"ids": ids}), "missing \\['mask'\\]"),
        (lambda: h(ids=ids, mask=ids, extra=ids), "unknown \\['extra'\\]"),
        (lambda: h(ids=ids.float(), mask=ids), "must be INT64, got FP32"),
        (lambda: h(ids=ids, mask=torch.zeros(3, 8, dtype=torch.int64)), "the same for every input"),
        (lambda: h(ids=torch.zeros(5, 8, dtype=torch.int64), mask=torch.zeros(5, 8, dtype=torch.int64)), "1 to 4"),
        (lambda: h(ids=[1, 2], mask=ids), "must be a torch.Tensor"),
    ]:
        with pytest.raises(ModelInputError, match=match):
            bad()
    assert len(sent) == 1
