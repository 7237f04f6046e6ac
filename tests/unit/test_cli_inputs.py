"""``swapserve invoke``'s inputs (``--random``, ``--input``): of every OIP datatype, what the gateway takes for
the declared input, in binary and in JSON tensors — BF16 included, which numpy lacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from swapserve.cli import _random_tensor, _read_input
from swapserve.functions.spec import FunctionSpec
from swapserve.gateway import oip
from swapserve.tensors import DATATYPES, torch_dtype


def spec_of(datatype: str) -> FunctionSpec:
    return FunctionSpec.from_dict({
        "name": "fn", "model": {"zoo": "mlp"}, "slo_ms": 100, "max_batch": 8,
        "inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]})


def taken(value: object, datatype: str) -> torch.Tensor:
    """The input as the gateway decodes it from the client's request, binary and JSON (the same both ways)."""
    tensor = torch.as_tensor(value)
    got = []
    for binary in (True, False):
        enc = oip.encode_infer_request({"x": tensor}, binary_inputs=binary)
        got.append(oip.decode_infer_request(enc.body, spec_of(datatype),
                                            str(enc.header_length) if binary else None).inputs["x"])
    assert torch.equal(got[0], got[1])
    assert got[0].dtype == torch_dtype(datatype)
    return got[0]


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_random_inputs_are_of_the_declared_datatype(datatype: str) -> None:
    if datatype == "BYTES":
        pytest.skip("no tensor datatype")
    x = taken(_random_tensor(np.random.default_rng(0), datatype, [2, 3]), datatype)
    assert x.shape == (2, 3)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16", "INT64", "INT8", "BOOL"])
def test_given_inputs_are_cast_to_the_declared_datatype(datatype: str, tmp_path: Path) -> None:
    declared = {"datatype": datatype, "shape": [-1, 3]}
    x = taken(_read_input("x", json.dumps([1, 0, 2]), declared), datatype)  # one row: a batch of one
    assert x.tolist() == torch.tensor([[1, 0, 2]]).to(torch_dtype(datatype)).tolist()
    np.save(tmp_path / "x.npy", np.array([[1.5, 0.0, -2.0], [0.0, 3.0, 1.0]]))
    x = taken(_read_input("x", str(tmp_path / "x.npy"), declared), datatype)
    assert x.shape == (2, 3)
