"""Open an artifact and check it against its manifest. Nothing here unpickles anything."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from swapserve.artifact.manifest import (
    EXAMPLES_FILE,
    MANIFEST_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    Manifest,
    dtype_from_name,
)
from swapserve.artifact.safetensors_io import MappedSafetensors, read_header
from swapserve.errors import ArtifactError


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def program_path(self) -> Path:
        return self.path / PROGRAM_FILE

    def open_weights(self) -> MappedSafetensors:
        return MappedSafetensors(self.weights_path)

    def structure(self) -> str:
        """A digest of what the model's run time depends on besides its weights' values: its program (or its
        architecture) and its tensors' dtypes and shapes. Two artifacts of one model structure — tenants'
        copies of one base model, say — have the same, whatever their weights or names; the node learns run
        times per structure (reads the program file: call it off the event loop)."""
        m = self.manifest
        digest = hashlib.sha256(json.dumps(
            [m.kind, m.architecture, m.aliases, m.max_batch,
             *([(t.dtype, t.shape, getattr(t, "index_bound", None)) for t in ts]
               for ts in (m.inputs, m.outputs, m.weights))], default=str).encode())
        if m.kind == "exported":
            digest.update(self.program_path.read_bytes())
        return digest.hexdigest()[:24]

    def examples(self, batch: int = 1) -> list[torch.Tensor]:
        """The example inputs shipped with the artifact, repeated to ``batch``."""
        path = self.path / EXAMPLES_FILE
        out = []
        with MappedSafetensors(path) as st:
            for spec in self.manifest.inputs:
                if spec.name not in st.entries:
                    raise ArtifactError(f"{path.name} has no example for input {spec.name!r}")
                e = st.entries[spec.name]
                raw = torch.frombuffer(bytearray(st.bytes_of(spec.name)), dtype=dtype_from_name(e.dtype))
                x = raw.reshape(e.shape)
                out.append(x.repeat(batch, *([1] * (x.dim() - 1))) if batch != 1 else x)
        return out


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Open the artifact at ``path``; raise :class:`ArtifactError` naming any inconsistency."""
    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a model artifact: it has no {MANIFEST_FILE}")
    manifest = Manifest.from_json(mpath.read_text())
    if manifest.kind == "exported" and not (path / PROGRAM_FILE).is_file():
        raise ArtifactError(f"{path} has no {PROGRAM_FILE}")
    wpath = path / WEIGHTS_FILE
    if not wpath.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS_FILE}")
    entries = read_header(wpath)
    for w in manifest.weights:
        e = entries.get(w.name)
        if e is None:
            raise ArtifactError(f"{WEIGHTS_FILE} lacks weight {w.name!r} that the manifest lists")
        if e.dtype != w.dtype or tuple(e.shape) != tuple(w.shape):
            raise ArtifactError(f"{WEIGHTS_FILE}: weight {w.name!r} is {e.dtype}{list(e.shape)}, "
                                f"the manifest says {w.dtype}{list(w.shape)}")
    return Artifact(path, manifest)
