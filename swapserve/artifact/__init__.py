"""Model artifacts: what a function ships (a torch.export program, safetensors weights, first-use order)."""

from swapserve.artifact.build import build_architecture_artifact, build_artifact
from swapserve.artifact.load import Artifact, load_artifact
from swapserve.artifact.manifest import Manifest, TensorSpec, WeightSpec

__all__ = [
    "Artifact",
    "Manifest",
    "TensorSpec",
    "WeightSpec",
    "build_architecture_artifact",
    "build_artifact",
    "load_artifact",
]
