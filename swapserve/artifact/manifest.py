"""The manifest of a model artifact: what a function ships, in plain JSON.

An artifact is a directory::

    manifest.json        this file's dataclasses
    program.json         the torch.export program, serialized without weights (exported kind)
    weights.safetensors  every weight, buffer and tensor constant, once each
    examples.safetensors example inputs (batch 1), used by demos, checks and benchmarks

``weights`` lists each distinct tensor in the order the forward pass first uses it; the host
store lays weights out in that order so that a pipelined swap-in can start computing after the
first chunk arrives.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from swapserve.errors import ArtifactError

FORMAT = "swapserve-artifact"
VERSION = 1

MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "weights.safetensors"
EXAMPLES_FILE = "examples.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)
"""Every dtype a manifest (and a tensor crossing between processes) may name."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ArtifactError(f"unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})") from None


_ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in _DTYPES.items()}


def itemsize(name: str) -> int:
    """Bytes per element of a dtype named as in manifests."""
    try:
        return _ITEMSIZE[name]
    except KeyError:
        raise ArtifactError(f"unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ArtifactError(f"unsupported dtype {dtype}")
    return name


def _bound(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"index_bound must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. ``-1`` in ``shape`` is the batch dimension when it is dynamic."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    index_bound: int | None = None
    """An integer input that indexes a table (token ids into an embedding): its values must lie in
    ``[0, index_bound)``. Found at build time; None where the input indexes no table the build saw. Out of
    range, such an index fails the request on a CPU but trips a device-side assert on a GPU, which leaves
    the worker's CUDA context unusable for every model on that GPU; so inputs are checked before they run."""

    def nbytes(self, batch: int = 1) -> int:
        n = 1
        for d in self.shape:
            n *= batch if d == -1 else d
        return n * itemsize(self.dtype)

    def index_error(self, x: torch.Tensor) -> str | None:
        """Why ``x`` cannot be this input's indices (a value outside ``[0, index_bound)``), or None."""
        if self.index_bound is None or not x.numel():
            return None
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.index_bound:
            return (f"values must lie in [0, {self.index_bound}) (it indexes a table of {self.index_bound} rows), "
                    f"got {lo} to {hi}")
        return None


@dataclass(frozen=True)
class WeightSpec:
    """One distinct tensor of the model's state."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * itemsize(self.dtype)


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: Literal["exported", "architecture"]
    """``exported``: program.json holds a torch.export program. ``architecture``: the fallback, a
    known architecture named in ``architecture`` plus weights."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: tuple[WeightSpec, ...]
    """Distinct tensors in first-use order."""
    aliases: dict[str, str] = field(default_factory=dict)
    """State names that share another weight's tensor (tied weights): alias → name in ``weights``."""
    max_batch: int = 1
    """Largest batch the program accepts; the batch dimension is dynamic when > 1."""
    architecture: dict[str, Any] | None = None
    """For kind ``architecture``: ``{"name": ..., "config": {...}}``."""
    torch_version: str = ""

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def dynamic_batch(self) -> bool:
        return any(-1 in s.shape for s in self.inputs)

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"manifest.json is not valid JSON: {e}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ArtifactError(f"manifest.json is not a {FORMAT} manifest")
        if body.get("version") != VERSION:
            raise ArtifactError(f"manifest version {body.get('version')!r} is not supported (expected {VERSION})")
        try:
            m = cls(
                name=str(body["name"]),
                kind=body["kind"],
                inputs=tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"]), _bound(s.get("index_bound")))
                             for s in body["inputs"]),
                outputs=tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in body["outputs"]),
                weights=tuple(WeightSpec(w["name"], w["dtype"], tuple(w["shape"])) for w in body["weights"]),
                aliases=dict(body.get("aliases") or {}),
                max_batch=int(body.get("max_batch", 1)),
                architecture=body.get("architecture"),
                torch_version=str(body.get("torch_version", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest.json is malformed: {type(e).__name__}: {e}") from None
        m.validate()
        return m

    def validate(self) -> None:
        if self.kind not in ("exported", "architecture"):
            raise ArtifactError(f"unknown artifact kind {self.kind!r}")
        if self.kind == "architecture" and not (self.architecture and "name" in self.architecture):
            raise ArtifactError("an 'architecture' artifact must name its architecture")
        if not self.inputs or not self.outputs:
            raise ArtifactError("a model needs at least one input and one output")
        if self.max_batch < 1:
            raise ArtifactError("max_batch must be at least 1")
        names = [w.name for w in self.weights]
        if len(set(names)) != len(names):
            raise ArtifactError("weights are listed twice in the manifest")
        for spec in (*self.inputs, *self.outputs, *self.weights):
            dtype_from_name(spec.dtype)
        for alias, target in self.aliases.items():
            if target not in names:
                raise ArtifactError(f"alias {alias!r} points at unknown weight {target!r}")
