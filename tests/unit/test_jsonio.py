"""swapserve.jsonio: orjson where it agrees with Python's json, json where it does not."""

from __future__ import annotations

import json
import math

import pytest

from swapserve import jsonio


def test_reads_what_python_writes_and_orjson_refuses() -> None:
    doc = {"x": [float("nan"), float("inf"), -float("inf"), 1.5], "big": 2**70}
    got = jsonio.loads(json.dumps(doc).encode())  # NaN, Infinity: json writes them, orjson refuses them
    assert math.isnan(got["x"][0]) and got["x"][1:] == [math.inf, -math.inf, 1.5] and got["big"] == 2**70
    assert jsonio.loads(memoryview(b'{"a": [1, 2.5, "s", null, true]}')) == {"a": [1, 2.5, "s", None, True]}
    assert jsonio.loads(bytearray(b"[NaN]"))[0] != jsonio.loads(bytearray(b"[NaN]"))[0]  # json's fallback, any buffer


@pytest.mark.parametrize("body", [b"{", b'{"a": }', b"\xff\xfe", b"", b"[1, 2"])
def test_malformed_json_fails_as_json_does(body: bytes) -> None:
    with pytest.raises(ValueError) as ours:
        jsonio.loads(body)
    with pytest.raises(ValueError) as theirs:
        json.loads(body)
    assert str(ours.value) == str(theirs.value)


def test_writes_compact_json_python_reads_back() -> None:
    doc = {"a": [0.1, 1e-05, 1e16, -0.0, 3], "b": {"c": None, "d": True}, "e": "ü\n\"", 7: (1, 2)}
    out = jsonio.dumps(doc)
    assert b": " not in out and b", " not in out  # compact
    assert json.loads(out) == {"a": [0.1, 1e-05, 1e16, -0.0, 3], "b": {"c": None, "d": True}, "e": "ü\n\"",
                               "7": [1, 2]}  # a key that is not a string is written as one, as json does


def test_non_finite_floats_are_written_as_python_does_when_asked() -> None:
    doc = {"x": [float("nan"), math.inf]}
    assert jsonio.dumps(doc, finite=False) == b'{"x":[NaN,Infinity]}'
    assert jsonio.dumps(doc) == b'{"x":[null,null]}'  # orjson's way: callers that may hold them say finite=False
