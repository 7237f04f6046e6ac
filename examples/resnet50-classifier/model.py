"""ResNet-50 for swapserve: ``build()`` returns the module and an example input.

Runs on the client at ``swapserve deploy`` time (never on the node). The weights are seeded random
ones so the example works offline; set ``WEIGHTS = "IMAGENET1K_V2"`` to ship torchvision's trained
ImageNet weights instead (downloaded once into the torch hub cache).
"""

import torch
import torchvision

WEIGHTS: str | None = None


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=WEIGHTS).eval()
    # fp32 here: function.yaml's `dtype: float16` casts the model and this example for export.
    image = torch.randn(1, 3, 224, 224)
    return model, (image,)
