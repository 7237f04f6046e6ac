"""Functions with handlers on the real node, over HTTP: a handler that calls two models (each its own
artifact in the bundle, its helper module and data file beside it) and combines them; handlers that raise,
sleep past their timeout, allocate past their memory limit, try to read another function's artifact or the
registry, return the wrong thing or call a model with the wrong shape — each answer right or the right
error, while a request to another function succeeds meanwhile; handlers refused at deploy.

All on the session's shared node (``server``), beside its ``mlp`` function.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from swapserve.functions.build import build_bundle
from swapserve.functions.bundle import pack

from .harness import (Functions, Server, assert_serves, assert_stopped_cleanly, concurrently, deploy, infer_json,
                      load_local_model, metric, outputs_of)

ENCODER_PY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(11)
    return nn.Linear(4, 3).eval(), (torch.randn(1, 4),)
'''

SCORER_PY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(12)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval(), (torch.randn(1, 4),)
'''

HELPERS_PY = '''
def normalise(x):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
'''

COMBO_HANDLER = '''
import torch
from swapserve.sandbox import Response

from helpers import normalise            # a module beside the handler


def setup():
    global WEIGHT
    with open("data/weight.txt") as f:    # a data file beside it (the working directory is the function's)
        WEIGHT = float(f.read())


def handle(request, models):
    if request.is_json:
        x = torch.tensor(request.json["rows"], dtype=torch.float32)
    else:
        x = request.inputs["rows"]
    x = normalise(x)
    encoded = models["encoder"](x=x)       # both calls are on their way before either result is asked for
    scored = models["scorer"](x)
    score = encoded.result()["h"] + WEIGHT * scored.result()["output"]
    if request.is_json:
        return {"score": score.tolist(), "best": score.argmax(-1).tolist()}
    return Response({"score": score, "best": score.argmax(-1)}, {"weight": WEIGHT})
'''

MISBEHAVE_HANDLER = '''
import time
import torch


def handle(request, models):
    do = request.json["do"] if request.is_json else request.parameters.get("do", "ok")
    if do == "ok":
        x = torch.tensor(request.json["x"]) if request.is_json else request.inputs["x"]
        y = models["model"](x).result()["output"]
        return {"y": y.tolist()} if request.is_json else {"y": y}
    if do == "raise":
        raise ValueError("bad pixel value -3")
    if do == "sleep":
        time.sleep(60)
    if do == "alloc":
        return {"n": torch.ones(1 << 30, dtype=torch.uint8).sum().item()}   # 1 GiB, past its 256 MiB
    if do == "read":
        found = {}
        for path in request.json["paths"]:
            try:
                with open(path, "rb") as f:
                    found[path] = f.read(64).hex()
            except OSError as e:
                found[path] = type(e).__name__
        return found
    if do == "wrong_type":
        return torch.zeros(2) if request.is_json else [1, 2]
    if do == "wrong_output":
        return {"nope": torch.zeros(1, 3)}
    if do == "wrong_shape":
        return {"y": models["model"](torch.zeros(1, 5)).result()["output"]}
    raise KeyError(do)
'''

LINEAR_PY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(13)
    return nn.Linear(4, 3).eval(), (torch.randn(1, 4),)
'''

X4 = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
Y3 = {"name": "y", "datatype": "FP32", "shape": [-1, 3]}

COMBO_SPEC = {
    "name": "combo",
    "models": {"encoder": {"python": "encoder.py:build", "inputs": [X4],
                           "outputs": [{"name": "h", "datatype": "FP32", "shape": [-1, 3]}]},
               "scorer": {"python": "scorer.py:build"}},
    "slo_ms": 60_000, "max_batch": 8, "late_policy": "serve",
    "inputs": [{"name": "rows", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "best", "datatype": "INT64", "shape": [-1]}],
    "handler": "handler.py",
}
MISBEHAVE_SPEC = {
    "name": "misbehave", "model": {"python": "model.py:build"}, "slo_ms": 60_000, "max_batch": 4,
    "late_policy": "serve", "inputs": [X4], "outputs": [Y3], "handler": "handler.py",
    "sandbox": {"timeout_s": 3, "memory_mb": 256, "max_sandboxes": 2},
}


def make_function(root: Path, spec: dict[str, Any], files: dict[str, str]) -> Path:
    """Write the function directory, build its bundle as ``swapserve deploy`` does, and pack it."""
    src = root / "src" / spec["name"]
    src.mkdir(parents=True)
    (src / "function.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    bundle = root / "bundles" / spec["name"]
    build_bundle(src, bundle, progress=lambda line: None)
    return pack(bundle)


@pytest.fixture(scope="module")
def handlers_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("handlers")


@pytest.fixture(scope="module")
def combo(server: Server, handlers_root: Path) -> dict[str, torch.nn.Module]:
    archive = make_function(handlers_root, COMBO_SPEC, {"encoder.py": ENCODER_PY, "scorer.py": SCORER_PY,
                                                        "helpers.py": HELPERS_PY, "data/weight.txt": "0.5\n",
                                                        "handler.py": COMBO_HANDLER})
    info = deploy(server, archive)
    assert (info["name"], info["state"]) == ("combo", "READY"), info
    src = handlers_root / "src" / "combo"
    return {name: load_local_model_from(src / f"{name}.py") for name in ("encoder", "scorer")}


@pytest.fixture(scope="module")
def misbehave(server: Server, handlers_root: Path) -> torch.nn.Module:
    archive = make_function(handlers_root, MISBEHAVE_SPEC, {"model.py": LINEAR_PY, "handler.py": MISBEHAVE_HANDLER})
    info = deploy(server, archive)
    assert (info["name"], info["state"]) == ("misbehave", "READY"), info
    return load_local_model(handlers_root / "src" / "misbehave")


def load_local_model_from(path: Path) -> torch.nn.Module:
    dest = path.parent / f"_{path.stem}"
    dest.mkdir(exist_ok=True)
    (dest / "model.py").write_text(path.read_text())
    return load_local_model(dest)


def combo_expected(models: dict[str, torch.nn.Module], rows: torch.Tensor) -> torch.Tensor:
    x = (rows - rows.mean(-1, keepdim=True)) / (rows.std(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        return models["encoder"](x) + 0.5 * models["scorer"](x)


def invoke(server: Server, name: str, value: Any, timeout: float = 60.0) -> Any:
    return server.post_json(f"/v1/functions/{name}/invoke", value, timeout=timeout)


# --- the right answer ------------------------------------------------------------------------------------


def test_handler_combines_two_models(server: Server, combo: dict[str, torch.nn.Module]) -> None:
    rows = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    want = combo_expected(combo, rows)
    r = infer_json(server, "combo", {"rows": rows})
    assert r.status == 200, r.body[:500]
    doc = r.json()
    got = outputs_of(doc)
    torch.testing.assert_close(got["score"], want, rtol=1e-5, atol=1e-6)
    assert got["best"].tolist() == want.argmax(-1).tolist()
    assert doc["parameters"]["weight"] == 0.5, "the handler's parameters come back"

    r = invoke(server, "combo", {"rows": rows.tolist()})
    assert r.status == 200, r.body[:500]
    torch.testing.assert_close(torch.tensor(r.json()["score"]), want, rtol=1e-5, atol=1e-6)


def test_models_come_in_while_the_sandbox_starts(server_factory, handlers_root: Path) -> None:
    """On a node that prepares nothing at deploy (``--no-prepare``) the function's models are on no device
    until they are needed; a sandbox's cold start copies them in meanwhile (a prefetch per model), so the
    handler's model calls find them resident: the node swaps exactly as many times as it prefetched."""
    s = server_factory(extra=("--no-prepare",)).start()
    s.wait_ready()
    before = s.request("GET", "/metrics").body.decode()
    spec = {**COMBO_SPEC, "name": "combo-cold"}
    archive = make_function(handlers_root, spec, {"encoder.py": ENCODER_PY, "scorer.py": SCORER_PY,
                                                  "helpers.py": HELPERS_PY, "data/weight.txt": "0.5\n",
                                                  "handler.py": COMBO_HANDLER})
    assert deploy(s, archive)["state"] == "READY"
    src = handlers_root / "src" / "combo-cold"
    models = {name: load_local_model_from(src / f"{name}.py") for name in ("encoder", "scorer")}
    rows = torch.randn(2, 4, generator=torch.Generator().manual_seed(8))
    r = invoke(s, "combo-cold", {"rows": rows.tolist()})
    assert r.status == 200, r.body[:500]
    torch.testing.assert_close(torch.tensor(r.json()["score"]), combo_expected(models, rows), rtol=1e-5, atol=1e-6)
    after = s.request("GET", "/metrics").body.decode()

    def grew(name: str) -> float:
        return metric(after, name, device="cpu") - metric(before, name, device="cpu")

    assert grew("swapserve_prefetches_total") == 2  # both models, while the sandbox started
    assert grew("swapserve_swap_seconds_count") == 0  # no swapped run: the calls found both models there
    assert grew("swapserve_swap_bytes_total") > 0  # the prefetches' copies
    assert grew("swapserve_compute_seconds_count") == 2  # the two model calls
    assert_stopped_cleanly(s, s.stop())


def test_json_route_from_the_client_and_the_cli(server: Server, combo: dict[str, torch.nn.Module],
                                               tmp_path: Path) -> None:
    rows = torch.randn(2, 4, generator=torch.Generator().manual_seed(6))
    want = combo_expected(combo, rows)
    answer = server.client().invoke_json("combo", {"rows": rows.tolist()})
    torch.testing.assert_close(torch.tensor(answer["score"]), want, rtol=1e-5, atol=1e-6)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"rows": rows.tolist()}))
    done = server.cli("invoke", "combo", "--body", f"@{body}")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout[:done.stdout.rindex("latency:")])
    torch.testing.assert_close(torch.tensor(printed["score"]), want, rtol=1e-5, atol=1e-6)
    assert printed["best"] == want.argmax(-1).tolist()
    refused = server.cli("invoke", "mlp", "--body", '{"x": [1]}')
    assert refused.returncode != 0 and "no handler" in refused.stderr
    bad = server.cli("invoke", "combo", "--body", "{not json")
    assert bad.returncode != 0 and "not JSON" in bad.stderr


def test_handler_function_is_described_with_its_models(server: Server, combo: Any) -> None:
    meta = server.request("GET", "/v2/models/combo").json()
    assert [t["name"] for t in meta["inputs"]] == ["rows"], "OIP metadata shows the handler's tensors"
    doc = server.request("GET", "/api/v1/functions/combo", token=True).json()
    assert sorted(doc["spec"]["models"]) == ["encoder", "scorer"] and doc["spec"]["handler"] == "handler.py"


def test_model_calls_are_scheduled_as_the_models_requests(server: Server, combo: Any) -> None:
    """Each model call went through the scheduler under its model's name (queue time observed)."""
    rows = torch.randn(1, 4)
    assert infer_json(server, "combo", {"rows": rows}).status == 200
    text = server.request("GET", "/metrics").body.decode()
    for model in ("combo/encoder", "combo/scorer"):
        assert f'function="{model}"' in text, f"no metrics of the model entity {model}"


def test_sandboxes_show_in_status_and_metrics(server: Server, combo: Any) -> None:
    assert infer_json(server, "combo", {"rows": torch.randn(1, 4)}).status == 200
    pools = {p["function"]: p for p in server.request("GET", "/api/v1/status", token=True).json()["sandboxes"]}
    combo_pool = pools["combo"]
    assert combo_pool["started"] >= 1 and combo_pool["requests"] >= 1 and combo_pool["cold_start_p50_ms"] > 0
    assert combo_pool["idle"] + combo_pool["busy"] + combo_pool["starting"] >= 1
    text = server.request("GET", "/metrics").body.decode()
    assert 'swapserve_sandbox_starts_total{function="combo",outcome="started"}' in text
    assert 'swapserve_handler_duration_seconds_count{function="combo"}' in text


def test_json_route_of_a_function_without_handler(server: Server) -> None:
    assert "no handler" in invoke(server, "mlp", {"x": [1]}).error(400)


# --- the right error, others unaffected ------------------------------------------------------------------


def while_busy(server: Server, functions: Functions, call: Any) -> Any:
    """``call()`` while requests to ``mlp`` run beside it: they all succeed; returns ``call``'s answer."""
    def one(i: int) -> Any:
        if i == 0:
            return call()
        time.sleep(0.2 * i)
        assert_serves(server, functions.mlp, seed=i)
        return None

    results = concurrently(4, one)
    for r in results[1:]:
        assert r is None, r
    assert not isinstance(results[0], BaseException), results[0]
    return results[0]


def still_works(server: Server, model: torch.nn.Module) -> None:
    x = torch.randn(2, 4)
    r = infer_json(server, "misbehave", {"x": x})
    assert r.status == 200, r.body[:500]
    with torch.no_grad():
        torch.testing.assert_close(outputs_of(r.json())["y"], model(x), rtol=1e-5, atol=1e-6)


def test_misbehave_answers_when_it_behaves(server: Server, misbehave: torch.nn.Module) -> None:
    still_works(server, misbehave)
    r = invoke(server, "misbehave", {"do": "ok", "x": [[1.0, 2.0, 3.0, 4.0]]})
    assert r.status == 200
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(r.json()["y"]), misbehave(torch.tensor([[1.0, 2.0, 3.0, 4.0]])))


def test_handler_that_raises(server: Server, functions: Functions, misbehave: torch.nn.Module) -> None:
    r = while_busy(server, functions, lambda: invoke(server, "misbehave", {"do": "raise"}))
    msg = r.error(500)
    assert "ValueError" in msg and "bad pixel value -3" in msg and "handler.py:" in msg, msg
    still_works(server, misbehave)


def test_handler_past_its_timeout(server: Server, functions: Functions, misbehave: torch.nn.Module) -> None:
    t0 = time.monotonic()
    r = while_busy(server, functions, lambda: invoke(server, "misbehave", {"do": "sleep"}))
    assert "did not answer within 3 s" in r.error(504)
    assert time.monotonic() - t0 < 20
    still_works(server, misbehave)


def test_handler_past_its_memory_limit(server: Server, functions: Functions, misbehave: torch.nn.Module) -> None:
    r = while_busy(server, functions, lambda: invoke(server, "misbehave", {"do": "alloc"}))
    assert "memory limit (256 MiB)" in r.error(500)
    still_works(server, misbehave)


def test_handler_cannot_read_other_functions_or_the_registry(server: Server, functions: Functions,
                                                              misbehave: Any) -> None:
    mlp_dir = server.home / "functions" / "mlp"
    artifact = next(mlp_dir.glob("v*/artifact/manifest.json"))
    store = next(p for p in server.shm_dir.rglob("*") if p.is_file())
    paths = [str(server.home / "registry.sqlite3"), str(artifact), str(store)]
    assert all(Path(p).is_file() for p in paths)
    r = while_busy(server, functions, lambda: invoke(server, "misbehave", {"do": "read", "paths": paths}))
    assert r.status == 200, r.body[:500]
    found = r.json()
    assert set(found) == set(paths)
    for path, what in found.items():
        assert what in ("PermissionError", "FileNotFoundError"), f"the handler read {path}: {what}"


@pytest.mark.parametrize("route", ["json", "oip"])
def test_handler_returning_the_wrong_type(server: Server, misbehave: Any, route: str) -> None:
    if route == "json":
        r = invoke(server, "misbehave", {"do": "wrong_type"})
    else:
        r = infer_json(server, "misbehave", {"x": torch.randn(1, 4)}, parameters={"do": "wrong_type"})
    assert "invalid response" in r.error(500)


def test_handler_returning_undeclared_outputs(server: Server, misbehave: Any) -> None:
    r = infer_json(server, "misbehave", {"x": torch.randn(1, 4)}, parameters={"do": "wrong_output"})
    msg = r.error(500)
    assert "must return the outputs ['y']" in msg and "unknown ['nope']" in msg, msg


def test_wrong_shape_to_a_model_handle(server: Server, misbehave: Any) -> None:
    msg = invoke(server, "misbehave", {"do": "wrong_shape"}).error(500)
    assert "model 'model'" in msg and "[1, 5]" in msg, msg


# --- refused at deploy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, code, expect", [
    ("bad-import", "import not_a_module_xyz\n\ndef handle(request, models):\n    return {}\n", "not_a_module_xyz"),
    ("no-handle", "def setup():\n    pass\n", "handle"),
    ("bad-setup", "def setup():\n    raise RuntimeError('vocab missing')\n\ndef handle(request, models):\n"
                  "    return {}\n", "vocab missing"),
])
def test_bad_handler_is_refused_at_deploy(server: Server, handlers_root: Path, name: str, code: str,
                                          expect: str) -> None:
    spec = dict(MISBEHAVE_SPEC, name=name)
    archive = make_function(handlers_root, spec, {"model.py": LINEAR_PY, "handler.py": code})
    r = server.request("POST", "/api/v1/functions", archive.read_bytes(), {"Content-Type": "application/gzip"},
                       token=True)
    assert expect in r.error(400)
    assert server.request("GET", f"/v2/models/{name}").status == 404, "nothing of it was registered"


def test_bystander_function_serves_throughout(server: Server, functions: Functions) -> None:
    assert_serves(server, functions.mlp, seed=99)


def test_delete_a_handler_function(server: Server, handlers_root: Path, functions: Functions) -> None:
    spec = dict(MISBEHAVE_SPEC, name="short-lived")
    deploy(server, make_function(handlers_root, spec, {"model.py": LINEAR_PY, "handler.py": MISBEHAVE_HANDLER}))
    assert invoke(server, "short-lived", {"do": "ok", "x": [[0.0, 1.0, 2.0, 3.0]]}).status == 200
    assert server.request("DELETE", "/api/v1/functions/short-lived", token=True).status == 200
    assert invoke(server, "short-lived", {"do": "ok", "x": [[0.0, 1.0, 2.0, 3.0]]}).status == 404
    assert_serves(server, functions.mlp, seed=7)

