"""A standard, unmodified Open Inference Protocol client against the real node: NVIDIA's ``tritonclient.http``
(KServe v2 / Triton HTTP), used exactly as a Triton user would, with nothing of swapserve's own on the client
side. Health, metadata, infer in every combination of JSON and binary tensors, the repository index,
load/unload (with the management token in an ``Authorization`` header, as any client can send one), and the
errors a client sees.

The node is the session's shared ``server`` (``mlp`` and ``pair``); the load/unload tests toggle a function of
their own (``tc-toggle``) so as not to change what other modules rely on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import tritonclient.http as tritonhttp  # the dev extra's tritonclient[http]
from tritonclient.utils import InferenceServerException

from .harness import Functions, Server, deploy

pytestmark = pytest.mark.integration

TOGGLE = "tc-toggle"


@pytest.fixture(scope="module")
def triton(server: Server):
    """The client as a Triton user makes it: ``host:port``, no scheme."""
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def auth(server: Server) -> dict[str, str]:
    """The management token as extra HTTP headers (tritonclient passes ``headers=`` through on every call)."""
    return {"Authorization": f"Bearer {server.token}"}


@pytest.fixture(scope="module")
def toggle(server: Server, functions: Functions, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of ``mlp`` under a name of its own, for the load/unload tests."""
    info = deploy(server, functions.mlp.variant(tmp_path_factory.mktemp("tc-archives"), name=TOGGLE))
    assert info["state"] == "READY", info
    return TOGGLE


def _pair_inputs(seed: int, rows: int = 3) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return (g.standard_normal((rows, 8)).astype(np.float32), g.integers(0, 10, (rows, 3), dtype=np.int64))


def _pair_expected(functions: Functions, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, z = functions.pair.expected(torch.from_numpy(x), torch.from_numpy(ids))
    return y.numpy(), z.numpy()


def _infer_pair(triton, x: np.ndarray, ids: np.ndarray, binary_in: bool, binary_out: bool | None, **kw):
    """``pair`` through tritonclient: inputs as JSON data or binary tensors; outputs requested with
    ``binary_data=binary_out`` (None: none requested, tritonclient then asks for binary_data_output)."""
    inputs = [tritonhttp.InferInput("x", list(x.shape), "FP32"), tritonhttp.InferInput("ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(x, binary_data=binary_in)
    inputs[1].set_data_from_numpy(ids, binary_data=binary_in)
    outputs = None if binary_out is None else [tritonhttp.InferRequestedOutput("y", binary_data=binary_out),
                                               tritonhttp.InferRequestedOutput("z", binary_data=binary_out)]
    return triton.infer("pair", inputs, outputs=outputs, **kw)


# -- health and metadata -------------------------------------------------------------------------------------


def test_server_live_ready_and_metadata(triton):
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True
    meta = triton.get_server_metadata()
    assert meta["name"] == "swapserve" and isinstance(meta["version"], str) and meta["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_ready_and_metadata(triton):
    assert triton.is_model_ready("mlp") is True
    assert triton.is_model_ready("pair", model_version="1") is True
    assert triton.is_model_ready("pair", model_version="2") is False
    meta = triton.get_model_metadata("pair")
    assert meta["name"] == "pair" and meta["versions"] == ["1"] and meta["platform"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("x", "FP32", [-1, 8]),
                                                                                 ("ids", "INT64", [-1, 3])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("y", "FP32", [-1, 4]),
                                                                                  ("z", "FP32", [-1, 1])]
    assert triton.get_model_metadata("pair", model_version="1") == meta
    mlp = triton.get_model_metadata("mlp")
    assert [(t["name"], t["datatype"], t["shape"]) for t in mlp["inputs"]] == [("x", "FP32", [-1, 16])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in mlp["outputs"]] == [("y", "FP32", [-1, 4])]


# -- inference -----------------------------------------------------------------------------------------------


def test_infer_every_encoding_matches_the_model(triton, functions: Functions):
    """Inputs as JSON or binary tensors x outputs as JSON or binary (and none requested): every answer matches
    the model, and all encodings carry the same bits (the node's run is the same; only the wire differs)."""
    x, ids = _pair_inputs(11)
    want_y, want_z = _pair_expected(functions, x, ids)
    got = {}
    for binary_in, binary_out in itertools.product((False, True), (False, True, None)):
        result = _infer_pair(triton, x, ids, binary_in, binary_out)
        response = result.get_response()
        assert response["model_name"] == "pair" and response["model_version"] == "1", response
        outs = {o["name"]: o for o in response["outputs"]}
        assert list(outs) == ["y", "z"], response
        assert (outs["y"]["datatype"], outs["y"]["shape"]) == ("FP32", [3, 4])
        assert (outs["z"]["datatype"], outs["z"]["shape"]) == ("FP32", [3, 1])
        as_binary = binary_out is not False  # none requested: tritonclient asks for binary_data_output
        for o in outs.values():
            assert ("binary_data_size" in o.get("parameters", {})) == as_binary, o
            assert ("data" in o) == (not as_binary), o
        y, z = result.as_numpy("y"), result.as_numpy("z")
        assert (y.dtype, y.shape, z.dtype, z.shape) == (np.float32, (3, 4), np.float32, (3, 1))
        torch.testing.assert_close(torch.from_numpy(y.copy()), torch.from_numpy(want_y))
        torch.testing.assert_close(torch.from_numpy(z.copy()), torch.from_numpy(want_z))
        got[binary_in, binary_out] = (y, z)
    first_y, first_z = next(iter(got.values()))
    for key, (y, z) in got.items():
        assert np.array_equal(y, first_y) and np.array_equal(z, first_z), f"{key} differs from the others"


def test_infer_mixed_output_encodings_and_selection(triton, functions: Functions):
    x, ids = _pair_inputs(12, rows=2)
    want_y, want_z = _pair_expected(functions, x, ids)
    inputs = [tritonhttp.InferInput("x", [2, 8], "FP32"), tritonhttp.InferInput("ids", [2, 3], "INT64")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    inputs[1].set_data_from_numpy(ids, binary_data=False)
    result = triton.infer("pair", inputs, outputs=[tritonhttp.InferRequestedOutput("y", binary_data=True),
                                                   tritonhttp.InferRequestedOutput("z", binary_data=False)])
    outs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "binary_data_size" in outs["y"]["parameters"] and "data" in outs["z"]
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("y").copy()), torch.from_numpy(want_y))
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("z").copy()), torch.from_numpy(want_z))

    only_z = triton.infer("pair", inputs, outputs=[tritonhttp.InferRequestedOutput("z")])
    assert [o["name"] for o in only_z.get_response()["outputs"]] == ["z"], "only the requested output"
    assert only_z.as_numpy("y") is None
    torch.testing.assert_close(torch.from_numpy(only_z.as_numpy("z").copy()), torch.from_numpy(want_z))


def test_infer_request_id_and_version(triton, functions: Functions):
    x = np.random.default_rng(13).standard_normal((4, 16)).astype(np.float32)
    inp = tritonhttp.InferInput("x", [4, 16], "FP32")
    inp.set_data_from_numpy(x)
    result = triton.infer("mlp", [inp], model_version="1", request_id="tc-req-1")
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("tc-req-1", "mlp", "1")
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("y").copy()),
                               functions.mlp.expected(torch.from_numpy(x))[0])


def test_async_infer_concurrently(server: Server, functions: Functions):
    """tritonclient's own concurrency (greenlets over a connection pool): each request gets its own rows."""
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}", concurrency=4)
    try:
        xs = [np.random.default_rng(100 + i).standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(8)]
        pending = []
        for x in xs:
            inp = tritonhttp.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            pending.append(client.async_infer("mlp", [inp]))
        for x, p in zip(xs, pending):
            y = p.get_result(timeout=60).as_numpy("y")
            torch.testing.assert_close(torch.from_numpy(y.copy()), functions.mlp.expected(torch.from_numpy(x))[0])
    finally:
        client.close()


# -- errors --------------------------------------------------------------------------------------------------


def test_unknown_model_raises_with_the_servers_message(triton, server: Server):
    assert triton.is_model_ready("nosuch") is False
    told = server.request("GET", "/v2/models/nosuch").error(404)
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nosuch")
    assert (e.value.status(), e.value.message()) == ("404", told)
    inp = tritonhttp.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nosuch", [inp])
    assert e.value.status() == "404" and "nosuch" in e.value.message()


def test_bad_input_raises_with_the_servers_message(triton):
    inp = tritonhttp.InferInput("x", [1, 15], "FP32")  # mlp takes [-1, 16]
    inp.set_data_from_numpy(np.zeros((1, 15), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        triton.infer("mlp", [inp])
    assert e.value.status() == "400" and "x" in e.value.message(), e.value
    inp = tritonhttp.InferInput("x", [1, 16], "FP64")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float64))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("mlp", [inp])
    assert e.value.status() == "400" and "FP32" in e.value.message(), e.value


# -- model repository ----------------------------------------------------------------------------------------


def test_repository_index(triton):
    index = {e["name"]: e for e in triton.get_model_repository_index()}
    assert index["mlp"] == {"name": "mlp", "version": "1", "state": "READY", "reason": ""}
    assert index["pair"]["state"] == "READY"


def test_load_and_unload_need_the_management_token(triton, toggle: str):
    """swapserve guards load/unload with its management token (Triton leaves them open): without one the client
    gets the server's 401 as an InferenceServerException, and nothing changes."""
    with pytest.raises(InferenceServerException) as e:
        triton.load_model(toggle)
    assert e.value.status() == "401" and "token" in e.value.message(), e.value
    with pytest.raises(InferenceServerException) as e:
        triton.unload_model(toggle)
    assert e.value.status() == "401" and "token" in e.value.message(), e.value
    assert triton.is_model_ready(toggle) is True


def test_load_model(triton, server: Server, toggle: str, auth: dict[str, str], functions: Functions):
    """tritonclient's load_model (body ``{}``) after an unload (done here by raw HTTP)."""
    r = server.post_json(f"/v2/repository/models/{toggle}/unload", {}, token=True)
    assert (r.status, r.json()["state"]) == (200, "UNAVAILABLE"), r.body
    assert triton.is_model_ready(toggle) is False
    triton.load_model(toggle, headers=auth)
    assert triton.is_model_ready(toggle) is True
    index = {e["name"]: e for e in triton.get_model_repository_index()}
    assert index[toggle]["state"] == "READY"
    x = np.ones((1, 16), np.float32)
    inp = tritonhttp.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    torch.testing.assert_close(torch.from_numpy(triton.infer(toggle, [inp]).as_numpy("y").copy()),
                               functions.mlp.expected(torch.from_numpy(x))[0])
    with pytest.raises(InferenceServerException) as e:
        triton.load_model("nosuch", headers=auth)
    assert e.value.status() == "404", e.value


def test_unload_model(triton, server: Server, toggle: str, auth: dict[str, str]):
    """tritonclient's unload_model then load_model: not ready in between, ready again after."""
    try:
        triton.unload_model(toggle, headers=auth)
        assert triton.is_model_ready(toggle) is False
        index = {e["name"]: e for e in triton.get_model_repository_index()}
        assert index[toggle]["state"] == "UNAVAILABLE"
        triton.load_model(toggle, headers=auth)
        assert triton.is_model_ready(toggle) is True
    finally:  # leave it serving whatever happened
        server.post_json(f"/v2/repository/models/{toggle}/load", {}, token=True)
