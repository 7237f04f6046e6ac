"""Artifacts: build and load round trips, the manifest, export failures, bad files, and the fallback."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from swapserve.artifact import build_architecture_artifact, build_artifact, load_artifact
from swapserve.artifact.manifest import (
    EXAMPLES_FILE,
    FORMAT,
    MANIFEST_FILE,
    PROGRAM_FILE,
    VERSION,
    WEIGHTS_FILE,
    Manifest,
)
from swapserve.engine import Residency
from swapserve.engine.program import load_program
from swapserve.errors import ArtifactError, ExportError


def listing(d: Path) -> list[str]:
    """Every entry, hidden ones included."""
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def run_loaded(art, inputs) -> list[torch.Tensor]:
    """Run a loaded artifact on CPU with its weights read from its own safetensors file."""
    prog = load_program(art, torch.device("cpu"), {w.name: 0 for w in art.manifest.weights})
    tensors = safetensors.torch.load_file(str(art.weights_path))
    prog.bind(tensors)
    with torch.no_grad():
        return prog.run(list(inputs))


# --- build and load ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_build_and_load_round_trip(make_artifact, kind):
    art, module, x = make_artifact(kind, max_batch=4)
    assert listing(art.path) == sorted([MANIFEST_FILE, PROGRAM_FILE, WEIGHTS_FILE, EXAMPLES_FILE])
    assert listing(art.path.parent) == [art.path.name]  # no staging directory left over
    again = load_artifact(art.path)
    assert again.manifest == art.manifest
    assert Manifest.from_json(art.manifest.to_json()) == art.manifest
    # every distinct tensor of the module is in the weights file, once, with its exact values
    tensors = safetensors.torch.load_file(str(art.weights_path))
    assert set(tensors) == {w.name for w in art.manifest.weights} and len(tensors) == len(art.manifest.weights)
    state = module.state_dict(keep_vars=False)
    for name, t in state.items():
        stored = tensors[art.manifest.aliases.get(name, name)]
        assert stored.dtype == t.dtype and torch.equal(stored, t), name
    assert art.manifest.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # the example inputs come back, at batch 1 and repeated
    (ex,) = art.examples()
    assert torch.equal(ex, x[0])
    (ex3,) = art.examples(3)
    assert ex3.shape[0] == 3 and all(torch.equal(ex3[i], x[0][0]) for i in range(3))
    # and the program computes what the module computes, at several batch sizes
    for batch_x in (x[0], ex3):
        with torch.no_grad():
            want = module(batch_x)
        (got,) = run_loaded(again, (batch_x,))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_manifest_fields_of_the_mlp(make_artifact):
    art, _, _ = make_artifact("mlp", max_batch=4)
    m = art.manifest
    assert (m.name, m.kind, m.max_batch, m.architecture) == ("mlp-0", "exported", 4, None)
    assert m.torch_version == torch.__version__
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("x", "float32", (-1, 512))]
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("output", "float32", (-1, 10))]
    assert m.dynamic_batch and m.aliases == {}
    names = [w.name for w in m.weights]
    assert names.index("fc1.weight") < names.index("bn.weight") < names.index("fc2.weight") < names.index("fc3.weight")
    assert names.index("fc1.weight") < names.index("fc1.bias") < names.index("fc2.weight")
    assert names[-1] == "bn.num_batches_tracked"  # never read by the program: last
    specs = {w.name: w for w in m.weights}
    assert specs["fc1.weight"].shape == (1024, 512) and specs["fc1.weight"].dtype == "float32"
    assert specs["bn.num_batches_tracked"].dtype == "int64" and specs["bn.num_batches_tracked"].shape == ()
    assert specs["fc2.weight"].nbytes == 1024 * 1024 * 4


def test_static_batch_and_custom_names(make_artifact, tmp_path):
    build = build_artifact
    art, module, x = make_artifact("mlp", max_batch=1)
    m = art.manifest
    assert m.max_batch == 1 and not m.dynamic_batch
    assert m.inputs[0].shape == (1, 512) and m.outputs[0].shape == (1, 10)
    m2 = build(module, x, tmp_path / "named", name="named", input_names=["features"], output_names=["logits"])
    assert [s.name for s in m2.inputs] == ["features"] and [s.name for s in m2.outputs] == ["logits"]
    assert load_artifact(tmp_path / "named").examples()[0].shape == (1, 512)
    with pytest.raises(ArtifactError, match="2 output names given for 1 outputs"):
        build(module, x, tmp_path / "bad-names", name="b", output_names=["a", "b"])
    with pytest.raises(ArtifactError, match="non-empty sequence of tensors"):
        build(module, (), tmp_path / "no-examples", name="e")
    assert not (tmp_path / "bad-names").exists() and not (tmp_path / "no-examples").exists()


def test_structure_is_the_same_for_other_weights_and_names_not_for_another_shape(make_artifact):
    """What the node learns run times by: two builds of one model with other weights (another seed) and another
    name share it; another dtype, batch or model does not."""
    a = make_artifact("mlp", seed=0)[0]
    same = make_artifact("mlp", seed=1, name="tenant-b")[0]
    assert a.structure() == same.structure()
    assert a.structure() != make_artifact("mlp", seed=2, dtype=torch.float16)[0].structure()
    assert a.structure() != make_artifact("mlp", seed=3, max_batch=8)[0].structure()
    assert a.structure() != make_artifact("tied")[0].structure()


def test_tied_weights_are_stored_once_with_an_alias(make_artifact):
    art, module, _ = make_artifact("tied")
    m = art.manifest
    names = [w.name for w in m.weights]
    assert len(names) == 4  # emb/head shared, pos, mix.weight, mix.bias
    tied = {"emb.weight", "head.weight"}
    (kept,) = tied & set(names)
    (alias,) = tied - {kept}
    assert m.aliases == {alias: kept}
    assert names[0] == kept  # the embedding is the first thing forward reads
    tensors = safetensors.torch.load_file(str(art.weights_path))
    assert set(tensors) == set(names)
    assert torch.equal(tensors[kept], module.emb.weight.detach())
    assert m.nbytes == (4096 * 256 + 64 * 256 + 256 * 256 + 256) * 4


# --- export failures ---------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class MutatesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_failed_export_names_the_cause_and_leaves_nothing(tmp_path, max_batch):
    out = tmp_path / "arts"
    out.mkdir()
    with pytest.raises(ExportError) as info:
        build_artifact(DataDependent(), (torch.randn(1, 8),), out / "dd", name="dd", max_batch=max_batch)
    msg = str(info.value)
    assert "torch.export could not capture dd" in msg
    cause = info.value.__cause__
    assert cause is not None and type(cause).__name__ in msg  # the cause is named ...
    assert "data-dependent" in msg.lower()  # ... in words
    assert "fallback" in msg.lower() and "architecture" in msg  # and the way out is mentioned
    assert info.value.http_status == 400
    assert listing(out) == []  # no artifact, no hidden .dd.tmp-* directory


def test_a_model_that_mutates_its_state_is_refused(tmp_path):
    with pytest.raises(ExportError, match="mutates its state"):
        build_artifact(MutatesBuffer(), (torch.randn(1, 8),), tmp_path / "m", name="m")
    assert listing(tmp_path) == []


class GhostBuffer(nn.Module):
    """Exports fine, but its (unused) buffer has no data, so writing the weights fails mid-build."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("ghost", torch.empty(3, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_failure_while_writing_leaves_no_staging_directory(tmp_path):
    out = tmp_path / "arts"
    with pytest.raises(Exception, match="meta"):
        build_artifact(GhostBuffer(), (torch.randn(1, 4),), out / "g", name="g")
    assert listing(out) == []
    with pytest.raises(Exception, match="meta"):
        build_architecture_artifact(GhostBuffer(), (torch.randn(1, 4),), out / "g", name="g",
                                    architecture="bert-encoder", config={})
    assert listing(out) == []


def test_building_into_an_existing_directory(make_artifact):
    art, module, x = make_artifact("mlp")
    before = (art.path / MANIFEST_FILE).read_text()
    with pytest.raises(ArtifactError, match="already exists"):
        build_artifact(module, x, art.path, name="other")
    assert (art.path / MANIFEST_FILE).read_text() == before
    assert listing(art.path.parent) == [art.path.name]
    m = build_artifact(module, x, art.path, name="replaced", overwrite=True)
    assert load_artifact(art.path).manifest == m and m.name == "replaced"
    assert listing(art.path.parent) == [art.path.name]  # no .old-* or .tmp-* left behind


# --- bad files ---------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    module = Small().eval()
    path = tmp_path_factory.mktemp("pristine") / "small"
    build_artifact(module, (torch.randn(1, 16),), path, name="small", max_batch=2)
    return path, module


@pytest.fixture
def small(pristine, tmp_path) -> tuple[Path, nn.Module]:
    """A fresh copy of a small good artifact, to damage."""
    path, module = pristine
    shutil.copytree(path, tmp_path / "small")
    load_artifact(tmp_path / "small")  # good before we damage it
    return tmp_path / "small", module


class _Touch:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _resave(good: Path, change) -> bytes:
    tensors = safetensors.torch.load_file(str(good))
    change(tensors)
    out = good.with_suffix(".tmp")
    safetensors.torch.save_file(tensors, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _bad_weights(case: str, good: Path, module: nn.Module, scratch: Path) -> bytes:
    rnd = random.Random(case)
    if case == "torch.save":
        torch.save(module.state_dict(), scratch / "sd.pt")
        return (scratch / "sd.pt").read_bytes()
    if case == "torch.save-legacy":
        torch.save(module.state_dict(), scratch / "sd.pt", _use_new_zipfile_serialization=False)
        return (scratch / "sd.pt").read_bytes()
    if case == "pickle-payload":
        return pickle.dumps(_Touch(scratch / "UNPICKLED"), protocol=4)
    if case == "random":
        return rnd.randbytes(4096)
    if case == "random-small-header":
        return struct.pack("<Q", 200) + rnd.randbytes(1000)
    if case == "empty":
        return b""
    if case == "truncated":
        data = good.read_bytes()
        return data[: len(data) - 100]
    if case == "truncated-header":
        return good.read_bytes()[:40]
    if case == "header-not-object":
        return _raw_safetensors([], b"")  # type: ignore[arg-type]
    if case == "overlapping":
        data = good.read_bytes()
        return _raw_safetensors({"fc1.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                 "fc1.bias": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, data[:64])
    if case == "shape":
        return _resave(good, lambda t: t.__setitem__("fc1.weight", t["fc1.weight"].t().contiguous()))
    if case == "dtype":
        return _resave(good, lambda t: t.__setitem__("fc1.weight", t["fc1.weight"].half()))
    if case == "missing":
        return _resave(good, lambda t: t.pop("fc3.bias"))
    raise ValueError(case)


BAD_WEIGHTS = {
    "torch.save": "pickle",
    "torch.save-legacy": "pickle",
    "pickle-payload": "never unpickles",
    "random": "not a valid safetensors file",
    "random-small-header": "not a valid safetensors file",
    "empty": "0 bytes long",
    "truncated": "truncated",
    "truncated-header": "not a valid safetensors file",
    "header-not-object": "not a JSON object",
    "overlapping": "overlap",
    "shape": r"fc1\.weight.*is float32\[16, 32\], the manifest says float32\[32, 16\]",
    "dtype": r"fc1\.weight.*is float16.*the manifest says float32",
    "missing": "lacks weight 'fc3.bias'",
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_files_are_refused_with_the_cause(small, tmp_path, case):
    path, module = small
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (path / WEIGHTS_FILE).write_bytes(_bad_weights(case, path / WEIGHTS_FILE, module, scratch))
    with pytest.raises(ArtifactError, match=BAD_WEIGHTS[case]) as info:
        load_artifact(path)
    assert info.value.http_status == 400
    assert not (scratch / "UNPICKLED").exists()


def _manifest_body(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


BAD_MANIFESTS = {
    "not-json": (lambda b: "{not json", "not valid JSON"),
    "a-list": (lambda b: "[]", f"not a {FORMAT} manifest"),
    "wrong-format": (lambda b: json.dumps({**b, "format": "onnx"}), f"not a {FORMAT} manifest"),
    "no-format": (lambda b: json.dumps({k: v for k, v in b.items() if k != "format"}), f"not a {FORMAT} manifest"),
    "wrong-version": (lambda b: json.dumps({**b, "version": VERSION + 1}), "version"),
    "unknown-kind": (lambda b: json.dumps({**b, "kind": "pickle"}), "unknown artifact kind 'pickle'"),
    "missing-field": (lambda b: json.dumps({k: v for k, v in b.items() if k != "inputs"}), "malformed"),
    "bad-field-type": (lambda b: json.dumps({**b, "weights": 7}), "malformed"),
    "bad-dtype": (lambda b: json.dumps({**b, "weights": [{**b["weights"][0], "dtype": "complex64"}]}),
                  "unsupported dtype 'complex64'"),
    "dangling-alias": (lambda b: json.dumps({**b, "aliases": {"x": "nope"}}), "unknown weight 'nope'"),
    "no-inputs": (lambda b: json.dumps({**b, "inputs": []}), "at least one input"),
    "architecture-unnamed": (lambda b: json.dumps({**b, "kind": "architecture", "architecture": None}),
                             "must name its architecture"),
    "max-batch-zero": (lambda b: json.dumps({**b, "max_batch": 0}), "max_batch"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifests_are_refused_with_the_cause(small, case):
    path, _ = small
    write, match = BAD_MANIFESTS[case]
    (path / MANIFEST_FILE).write_text(write(_manifest_body(path)))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(path)


def test_missing_files_are_named(pristine, tmp_path):
    path, _ = pristine
    for missing, match in [(MANIFEST_FILE, "no manifest.json"), (PROGRAM_FILE, "has no program.json"),
                           (WEIGHTS_FILE, "has no weights.safetensors")]:
        d = tmp_path / f"without-{missing}"
        shutil.copytree(path, d)
        (d / missing).unlink()
        with pytest.raises(ArtifactError, match=match):
            load_artifact(d)
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_artifact(tmp_path / "does-not-exist")


# --- the fallback: a known architecture plus weights -------------------------------------------


@pytest.fixture(scope="module")
def bert_tiny(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from swapserve.artifact import zoo

    zm = zoo.get("bert-tiny")
    module, x = zm.build(), zm.example()
    path = tmp_path_factory.mktemp("fallback") / "bert-tiny"
    manifest = build_architecture_artifact(module, x, path, name="bert-tiny", architecture=zm.architecture,
                                           config=zm.config)
    return zm, module, x, path, manifest


def test_fallback_artifact_manifest(bert_tiny):
    zm, module, x, path, manifest = bert_tiny
    assert zm.architecture == "bert-encoder"
    assert manifest.kind == "architecture"
    assert manifest.architecture == {"name": "bert-encoder", "config": zm.config}
    assert listing(path) == sorted([MANIFEST_FILE, WEIGHTS_FILE, EXAMPLES_FILE])  # no program
    art = load_artifact(path)
    assert art.manifest == manifest
    assert [(s.dtype, s.shape) for s in manifest.inputs] == [("int64", (1, 32))]
    assert [(s.dtype, s.shape) for s in manifest.outputs] == [("float32", (1, 32, 128))]
    names = [w.name for w in manifest.weights]
    # first-use order: the embeddings, then layer 0, then layer 1
    assert names.index("bert.embeddings.word_embeddings.weight") < names.index(
        "bert.encoder.layer.0.attention.self.query.weight") < names.index(
        "bert.encoder.layer.1.attention.self.query.weight") < names.index("bert.encoder.layer.1.output.dense.weight")
    state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    assert set(names) | set(manifest.aliases) == state


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="unknown architecture 'resnet-9000'"):
        build_architecture_artifact(nn.Linear(2, 2), (torch.randn(1, 2),), tmp_path / "x", name="x",
                                    architecture="resnet-9000", config={})
    assert listing(tmp_path) == []


def test_fallback_runs_on_the_engine_like_the_module(bert_tiny, make_engine):
    _, module, x, path, _ = bert_tiny
    art = load_artifact(path)
    eng = make_engine()
    eng.add("bert", art)
    assert eng.activation_bytes("bert", 1) is None  # no graph to walk for a rebuilt module
    cold = eng.infer("bert", x)  # swapped in onto fresh pages while running
    assert eng.stats.swaps == 1
    warm = eng.infer("bert", x)  # resident: no copy, no wait
    assert eng.stats.resident_runs == 1 and eng.residency("bert") is Residency.RESIDENT
    with torch.no_grad():
        want = module(*x)
    torch.testing.assert_close(warm[0], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(cold[0], warm[0])  # bit for bit
    eng.evict("bert")
    again = eng.infer("bert", x)
    assert eng.stats.swaps == 2 and torch.equal(again[0], warm[0])


def test_inputs_that_index_a_table_carry_its_size_and_out_of_range_values_are_named(tmp_path):
    from torch import nn

    from swapserve.artifact import build_artifact, load_artifact, zoo
    from swapserve.artifact.build import build_architecture_artifact

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.emb = nn.Embedding(10, 4)
            self.small = nn.Embedding(7, 4)

        def forward(self, x, ids, flags):
            return torch.relu(self.fc(x)) + self.emb(ids).sum(1) + self.small(ids.view(-1)).sum(0) + flags.sum()

    examples = (torch.randn(1, 8), torch.randint(0, 7, (1, 3)), torch.ones(1, 2, dtype=torch.int64))
    build_artifact(Pair().eval(), examples, tmp_path / "p", name="p", max_batch=4)
    x, ids, flags = load_artifact(tmp_path / "p").manifest.inputs  # bounds survive the manifest's round trip
    assert (x.index_bound, ids.index_bound, flags.index_bound) == (None, 7, None)  # the smaller table; a plain int
    assert ids.index_error(torch.tensor([[0, 6, 3]])) is None
    assert "[0, 7)" in ids.index_error(torch.tensor([[0, 7, 3]])) and "got -1 to 3" in ids.index_error(
        torch.tensor([[-1, 2, 3]]))
    z = zoo.get("bert-tiny")  # the fallback path: a known architecture, its vocabulary as the bound
    m = build_architecture_artifact(z.build(torch.float32), z.example(1, torch.float32), tmp_path / "b", name="b",
                                    architecture=z.architecture, config=z.config)
    assert m.inputs[0].index_bound == 30522
