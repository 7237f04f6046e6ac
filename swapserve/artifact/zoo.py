"""The model zoo: real architectures with random weights (no hub downloads), for demos, tests and
benchmarks. Each entry is a known architecture plus a config and an example input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swapserve.artifact import architectures

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
GPT2_MEDIUM = dict(n_embd=1024, n_layer=24, n_head=16)
SEQ_LEN = 128


@dataclass(frozen=True)
class ZooModel:
    name: str
    architecture: str
    config: dict[str, Any]
    input_kind: str
    """``image`` (float NCHW) or ``tokens`` (int64 ids)."""
    input_shape: tuple[int, ...]
    """Shape of one example, without the batch dimension."""

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The module with seeded random weights, in eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = architectures.build(self.architecture, self.config)
        return module.to(dtype)

    def example(self, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.input_kind == "tokens":
            vocab = self.config.get("vocab_size", 30522 if self.architecture == "bert-encoder" else 50257)
            return (torch.randint(0, vocab, (batch, *self.input_shape), generator=g),)
        return (torch.randn((batch, *self.input_shape), generator=g).to(dtype),)


def _tv(name: str, size: int = 224, **kwargs: Any) -> ZooModel:
    return ZooModel(name, "torchvision", {"model": name, "kwargs": kwargs}, "image", (3, size, size))


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        _tv("resnet50"),
        # Zero-initialised residual branches keep 152 layers of random fp16 weights from overflowing.
        _tv("resnet152", zero_init_residual=True),
        _tv("densenet201"),
        _tv("inception_v3", 299, init_weights=False, aux_logits=True),
        _tv("efficientnet_b0"),
        _tv("vit_b_16"),
        _tv("vgg19"),
        ZooModel("bert-base", "bert-encoder", BERT_BASE, "tokens", (SEQ_LEN,)),
        ZooModel("bert-large", "bert-encoder", BERT_LARGE, "tokens", (SEQ_LEN,)),
        ZooModel("gpt2-medium", "gpt2-lm", GPT2_MEDIUM, "tokens", (SEQ_LEN,)),
        # Small members for tests and the CPU demo.
        _tv("resnet18"),
        ZooModel("bert-tiny", "bert-encoder",
                 dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512), "tokens", (32,)),
    ]
}

BENCHMARK_ZOO = ["resnet50", "resnet152", "densenet201", "inception_v3", "efficientnet_b0", "vit_b_16", "vgg19",
                 "bert-base", "bert-large", "gpt2-medium"]


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r} (have: {', '.join(ZOO)})") from None
