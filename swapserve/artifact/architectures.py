"""Known architectures: model code that ships with swapserve (never with a tenant).

They serve two purposes: the zoo builds its models from them, and an artifact of kind
``architecture`` (the fallback for a model that torch.export cannot capture) names one of them plus
a config, so a worker can rebuild the module from trusted code and load the tenant's safetensors
weights into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from swapserve.errors import ArtifactError


class BertEncoder(nn.Module):
    """A BERT encoder that returns the last hidden state (batch, seq, hidden)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(**config), add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


class GPT2LM(nn.Module):
    """GPT-2 with its language-model head; returns logits (batch, seq, vocab)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.gpt2 = GPT2LMHeadModel(GPT2Config(**config))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=input_ids).logits


def _torchvision(config: dict[str, Any]) -> nn.Module:
    import torchvision

    kwargs = dict(config.get("kwargs", {}))
    return torchvision.models.get_model(config["model"], weights=None, **kwargs)


_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "torchvision": _torchvision,
    "bert-encoder": BertEncoder,
    "gpt2-lm": GPT2LM,
}


def names() -> list[str]:
    return sorted(_BUILDERS)


def build(name: str, config: dict[str, Any]) -> nn.Module:
    """Build a known architecture with freshly initialised weights, in eval mode."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ArtifactError(f"unknown architecture {name!r} (known: {', '.join(names())})") from None
    try:
        module = builder(config)
    except ImportError as e:
        raise ArtifactError(f"architecture {name!r} needs a package that is not installed: {e.name}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(f"bad config for architecture {name!r}: {e}") from None
    return module.eval()
