"""build_bundle from each model source kind, and clear errors when a model does not match function.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from swapserve.artifact import build_artifact, load_artifact
from swapserve.errors import ArtifactError
from swapserve.functions import SpecError, load_spec
from swapserve.functions.build import build_bundle

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x, ids):
        return torch.relu(self.fc(x)) + self.emb(ids).sum(1)


def build():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(1, 8), torch.randint(0, 10, (1, 3)))


def build_single_tensor_example():
    return nn.Linear(8, 4).eval(), torch.randn(1, 8)


def broken():
    raise RuntimeError("weights not found at /data/w.bin")
'''


def tiny_spec(**over: Any) -> dict[str, Any]:
    spec = {
        "name": "tiny", "model": {"python": "model.py:build"}, "slo_ms": 20, "max_batch": 4,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]},
                   {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    spec.update(over)
    return spec


def function_dir(root: Path, spec: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "function.yaml").write_text(yaml.safe_dump(spec))
    for name, text in {"model.py": TINY_MODEL, **(files or {})}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no staging leftovers"


def test_python_source_with_dtype_and_handler(tmp_path: Path):
    """With a handler, the function's inputs/outputs are the handler's; the model keeps torch.export's names
    (its forward's arguments, ``output``) and the handler's files travel along."""
    spec_raw = tiny_spec(model={"python": "model.py:build", "dtype": "float16"}, handler="handlers/pre.py",
                         inputs=[{"name": "text", "datatype": "UINT8", "shape": [-1, 64]}],
                         outputs=[{"name": "score", "datatype": "FP32", "shape": [-1]}])
    src = function_dir(tmp_path / "fn", spec_raw, {"handlers/pre.py": "def pre(x):\n    return x\n"})
    lines: list[str] = []
    spec = build_bundle(src, tmp_path / "out", progress=lines.append)
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.parent != out / "artifact") \
        == ["function.yaml", "handlers/pre.py", "model.py"]
    assert (out / "handlers" / "pre.py").read_text() == "def pre(x):\n    return x\n"
    assert load_spec(out) == spec, "the bundle's function.yaml is the normalised spec"
    art = load_artifact(out / "artifact")
    m = art.manifest
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [("x", "float16", (-1, 8)), ("ids", "int64", (-1, 3))]
    assert [(t.name, t.dtype) for t in m.outputs] == [("output", "float16")]
    assert m.max_batch == 4 and m.name == "tiny"
    assert all(w.dtype == "float16" for w in m.weights)
    assert any("export" in line for line in lines) and "bundle ready" in lines[-1]


def test_python_source_may_return_a_single_example_tensor(tmp_path: Path):
    src = function_dir(tmp_path / "fn", tiny_spec(model={"python": "model.py:build_single_tensor_example"},
                                                  inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]))
    build_bundle(src, tmp_path / "out")
    assert [t.name for t in load_artifact(tmp_path / "out" / "artifact").manifest.inputs] == ["x"]


def test_zoo_source(tmp_path: Path):
    spec = {"name": "tiny-bert", "model": {"zoo": "bert-tiny", "seed": 3}, "slo_ms": 20, "max_batch": 2,
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 32]}],
            "outputs": [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, 32, 128]}]}
    src = function_dir(tmp_path / "fn", spec, {})
    build_bundle(src, tmp_path / "out")
    art = load_artifact(tmp_path / "out" / "artifact")
    assert art.manifest.max_batch == 2
    # Seeded: the same weights as the zoo model built directly with that seed.
    from swapserve.artifact import zoo

    ref = zoo.get("bert-tiny").build(torch.float32, seed=3).state_dict()
    with art.open_weights() as st:
        name = "bert.embeddings.word_embeddings.weight"
        got = torch.frombuffer(bytearray(st.bytes_of(name)), dtype=torch.float32).reshape(ref[name].shape)
    assert torch.equal(got, ref[name])


def test_artifact_source(tmp_path: Path):
    src = function_dir(tmp_path / "fn", tiny_spec(model={"artifact": "prebuilt"}))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4))
    build_artifact(module, (torch.randn(2, 8),), src / "prebuilt", name="whatever", max_batch=4,
                   input_names=["x"], output_names=["y"])
    spec = tiny_spec(model={"artifact": "prebuilt"}, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 8]}])
    (src / "function.yaml").write_text(yaml.safe_dump(spec))
    build_bundle(src, tmp_path / "out")
    assert (tmp_path / "out" / "artifact" / "weights.safetensors").read_bytes() == \
        (src / "prebuilt" / "weights.safetensors").read_bytes()
    # The prebuilt artifact was exported for batches up to 4: a spec asking for 8 is refused.
    (src / "function.yaml").write_text(yaml.safe_dump({**spec, "max_batch": 8}))
    with pytest.raises(SpecError, match=r"max_batch: 8 exceeds"):
        build_bundle(src, tmp_path / "out2")
    assert_nothing_left(tmp_path / "out2")


@pytest.mark.parametrize(("change", "field"), [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 9]},
                 {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]}, r"inputs\[0\]\.shape: declared \[-1, 9\]"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]},
                 {"name": "ids", "datatype": "INT32", "shape": [-1, 3]}]}, r"inputs\[1\]\.datatype: declared INT32"),
    ({"outputs": [{"name": "y", "datatype": "FP16", "shape": [-1, 4]}]}, r"outputs\[0\]\.datatype: declared FP16"),
    ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 5]}]}, r"outputs\[0\]\.shape"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]}, r"inputs: declared 1 \(\['x'\]\), the model takes 2"),
    ({"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                  {"name": "z", "datatype": "FP32", "shape": [-1, 4]}]}, r"outputs: declared 2 .* returns 1"),
])
def test_a_mismatched_spec_is_a_spec_error_naming_the_field(tmp_path: Path, change: dict[str, Any], field: str):
    src = function_dir(tmp_path / "fn", tiny_spec(**change))
    with pytest.raises(SpecError, match=field):
        build_bundle(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"handler": "missing.py"}, SpecError, r"handler: 'missing.py' does not exist"),
    ({"model": {"python": "nope.py:build"}}, SpecError, r"model.python: 'nope.py' does not exist"),
    ({"model": {"python": "model.py:absent"}}, SpecError, r"model.py has no function 'absent'"),
    ({"model": {"python": "model.py:broken"}}, ArtifactError, r"broken\(\) failed: RuntimeError: weights not found"),
    ({"model": {"zoo": "resnet9000"}}, SpecError, r"model.zoo: no zoo model 'resnet9000'"),
    ({"model": {"artifact": "nowhere"}}, SpecError, r"model.artifact: 'nowhere' is not a directory"),
    ({"slo_ms": -1, "bogus": 1}, SpecError, r"slo_ms: must be at least 1.*bogus: unknown field|bogus: unknown field"),
])
def test_build_errors_name_their_cause(tmp_path: Path, change: dict[str, Any], error: type[Exception], message: str):
    src = function_dir(tmp_path / "fn", tiny_spec(**change))
    with pytest.raises(error, match=message):
        build_bundle(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_a_tenant_file_that_fails_to_import(tmp_path: Path):
    src = function_dir(tmp_path / "fn", tiny_spec(), {"model.py": "import no_such_package_xyz\n"})
    with pytest.raises(ArtifactError, match=r"importing model.py failed: ModuleNotFoundError"):
        build_bundle(src, tmp_path / "out")


def test_out_dir_must_be_new_and_a_missing_spec_is_named(tmp_path: Path):
    src = function_dir(tmp_path / "fn", tiny_spec())
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        build_bundle(src, tmp_path / "out")
    with pytest.raises(SpecError, match="no function.yaml"):
        build_bundle(tmp_path / "empty", tmp_path / "out3")


def test_python_source_is_loaded_without_touching_sys_path(tmp_path: Path):
    # A tenant file named like a standard module must not shadow it (model.py imports torch after it).
    src = function_dir(tmp_path / "fn", tiny_spec(), {"tokenize.py": "raise SystemExit('shadowed')\n"})
    import sys

    before = list(sys.path)
    build_bundle(src, tmp_path / "out")
    assert sys.path == before


# --- several models, and the files beside a handler ---------------------------------------------------------

SCORER = '''
import torch
from torch import nn


def build():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 2), nn.Tanh()).eval(), (torch.randn(1, 8),)
'''

TWO_MODELS = {"encoder": {"python": "model.py:build",
                          "outputs": [{"name": "h", "datatype": "FP32", "shape": [-1, 4]}]},
              "scorer": {"python": "scorer.py:build"}}


def test_several_models_each_their_own_artifact(tmp_path: Path):
    spec_raw = tiny_spec(model=None, models=TWO_MODELS, handler="handler.py",
                         inputs=[{"name": "text", "datatype": "UINT8", "shape": [-1, 16]}])
    del spec_raw["model"]
    src = function_dir(tmp_path / "fn", spec_raw, {"scorer.py": SCORER, "handler.py": "def handle(r, m):\n    pass\n"})
    spec = build_bundle(src, tmp_path / "out")
    out = tmp_path / "out"
    assert list(spec.models) == ["encoder", "scorer"] and load_spec(out) == spec
    enc = load_artifact(out / "models" / "encoder").manifest
    assert [t.name for t in enc.inputs] == ["x", "ids"] and [t.name for t in enc.outputs] == ["h"]
    sc = load_artifact(out / "models" / "scorer").manifest
    assert [(t.name, t.shape) for t in sc.inputs] == [("input", (-1, 8))] and [t.name for t in sc.outputs] == ["output"]
    assert not (out / "artifact").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"handler": None}, r"models: 2 models need a handler"),
    ({"models": {**TWO_MODELS, "encoder": {**TWO_MODELS["encoder"], "outputs": [
        {"name": "h", "datatype": "FP32", "shape": [-1, 5]}]}}}, r"models\.encoder\.outputs\[0\]\.shape: declared \[-1, 5\]"),
    ({"models": {"bad name": {"zoo": "bert-tiny"}}}, r"models: 'bad name' is not a valid model name"),
    ({"model": {"zoo": "bert-tiny"}}, r"model: required \(or models: .*\), not both"),
    ({"sandbox": {"timeout_s": 0, "memory_mb": 1.5, "extra": 1}},
     r"sandbox.extra: unknown field.*sandbox.timeout_s: must be at least 0.01.*sandbox.memory_mb: 1.5 is not an integer"),
])
def test_several_models_errors(tmp_path: Path, change: dict[str, Any], message: str):
    spec_raw = tiny_spec(**{"models": TWO_MODELS, "handler": "handler.py", **change})
    if "model" not in change:
        del spec_raw["model"]
    spec_raw = {k: v for k, v in spec_raw.items() if v is not None}
    src = function_dir(tmp_path / "fn", spec_raw, {"scorer.py": SCORER, "handler.py": "def handle(r, m):\n    pass\n"})
    with pytest.raises(SpecError, match=message):
        build_bundle(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_sandbox_settings_need_a_handler():
    from swapserve.functions.spec import FunctionSpec

    with pytest.raises(SpecError, match="sandbox: only a function with a handler"):
        FunctionSpec.from_dict(tiny_spec(sandbox={"timeout_s": 2}))
    spec = FunctionSpec.from_dict(tiny_spec(handler="h.py", sandbox={"timeout_s": 2}))
    assert (spec.sandbox.timeout_s, spec.sandbox.memory_mb, spec.sandbox.max_sandboxes) == (2.0, 1024, 2)
    assert FunctionSpec.from_dict(spec.to_dict()) == spec


def handler_fn(tmp_path: Path, files: dict[str, str]) -> Path:
    return function_dir(tmp_path / "fn", tiny_spec(handler="handler.py"),
                        {"handler.py": "def handle(r, m):\n    pass\n", **files})


def test_handler_files_travel_with_it(tmp_path: Path):
    src = handler_fn(tmp_path, {"lib/helpers.py": "X = 1\n", "vocab.txt": "a\nb\n", ".git/config": "x",
                                "lib/__pycache__/helpers.cpython-311.pyc": "x"})
    (src / "alias.txt").symlink_to(src / "vocab.txt")  # a link inside the directory: copied as the file
    build_bundle(src, tmp_path / "out")
    out = tmp_path / "out"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "artifact" not in p.parts)
    assert files == ["alias.txt", "function.yaml", "handler.py", "lib/helpers.py", "model.py", "vocab.txt"]
    assert not (out / "alias.txt").is_symlink() and (out / "alias.txt").read_text() == "a\nb\n"


def test_handler_files_may_not_lead_out_or_take_reserved_names(tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    src = handler_fn(tmp_path, {})
    (src / "leak.txt").symlink_to(secret)
    with pytest.raises(SpecError, match=r"leak.txt is a symlink out of the function directory"):
        build_bundle(src, tmp_path / "out")
    (src / "leak.txt").unlink()
    (src / "data").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SpecError, match=r"data is a symlinked directory"):
        build_bundle(src, tmp_path / "out")
    (src / "data").unlink()
    (src / "models").mkdir()
    with pytest.raises(SpecError, match=r"models is a name the bundle reserves"):
        build_bundle(src, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_handler_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from swapserve.functions import files

    monkeypatch.setattr(files, "MAX_FILES", 3)
    src = handler_fn(tmp_path, {f"f{i}.txt": "x" for i in range(3)})
    with pytest.raises(SpecError, match=r"more than 3 files"):
        build_bundle(src, tmp_path / "out")


def test_a_node_builds_apart_in_a_process_of_its_own(tmp_path: Path):
    """The node's demo functions are built by ``python -m swapserve.functions.build`` (serve.build_apart): the
    bundle as build_bundle writes it, each step reported; a failing build's own message raised."""
    import asyncio

    from swapserve.node.serve import build_apart

    steps: list[str] = []
    asyncio.run(build_apart(function_dir(tmp_path / "fn", tiny_spec()), tmp_path / "bundle", steps.append))
    assert load_spec(tmp_path / "bundle").name == "tiny"
    assert load_artifact(tmp_path / "bundle" / "artifact").manifest.inputs[0].name == "x"
    assert any("function.yaml is valid" in s for s in steps), steps
    broken = function_dir(tmp_path / "broken", tiny_spec(model={"python": "model.py:broken"}))
    with pytest.raises(ArtifactError, match="weights not found at /data/w.bin"):
        asyncio.run(build_apart(broken, tmp_path / "bundle2", steps.append))
    assert not (tmp_path / "bundle2").exists()
