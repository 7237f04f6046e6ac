"""A function's manifest, ``function.yaml``: what is served, under which name and SLO.

    name: resnet50                  # lowercase letters, digits, '-' and '_'; starts with a letter or digit
    model:                          # exactly one source:
      zoo: resnet50                 #   a zoo model with seeded random weights (+ seed, dtype)
      # python: model.py:build      #   a function returning (module, example_inputs), run on the client
      # artifact: artifact/         #   a prebuilt artifact directory
      dtype: float16                # optional cast for zoo/python sources
    slo_ms: 100                     # latency objective of one request, end to end
    max_batch: 8                    # requests of this function batched up to this size
    late_policy: refuse             # refuse (503 + Retry-After) or serve a request that will miss its SLO
    max_queue: 64                   # queued requests beyond which new ones get 429
    inputs:  [{name: input, datatype: FP32, shape: [-1, 3, 224, 224]}]    # -1: the batch dimension
    outputs: [{name: logits, datatype: FP32, shape: [-1, 1000]}]
    handler: handler.py             # optional tenant code (run in a sandbox)

Every problem is reported at once, each with the field it concerns.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from swapserve.artifact.manifest import Manifest, dtype_from_name
from swapserve.errors import SwapserveError
from swapserve.tensors import DATATYPES, datatype_of

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SPEC_FILE = "function.yaml"


class SpecError(SwapserveError):
    """An invalid function manifest; ``problems`` lists each as ``field: what is wrong``."""

    http_status = 400

    def __init__(self, problems: list[str], source: str = SPEC_FILE):
        super().__init__(f"invalid {source}: " + "; ".join(problems))
        self.problems = problems


def check_name(name: object) -> str:
    """A function name safe to use as a path component and a URL segment."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError([f"name: {name!r} is not a valid function name (lowercase letters, digits, '-', '_'; "
                         "1-63 characters; starting with a letter or digit)"])
    return name


@dataclass(frozen=True)
class TensorDecl:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 marks the batch dimension (first only)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["zoo", "python", "artifact"]
    ref: str
    """Zoo name, ``file.py:function``, or an artifact directory relative to the function directory."""
    dtype: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    model: ModelSource
    slo_ms: float
    max_batch: int = 1
    inputs: tuple[TensorDecl, ...] = ()
    outputs: tuple[TensorDecl, ...] = ()
    late_policy: Literal["refuse", "serve"] = "refuse"
    max_queue: int = 64
    handler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        d["model"] = {k: v for k, v in {self.model.kind: self.model.ref, "dtype": self.model.dtype,
                                         "seed": self.model.seed if self.model.kind == "zoo" else None}.items()
                      if v is not None}
        return {k: v for k, v in d.items() if v is not None}

    def check_against(self, manifest: Manifest) -> None:
        """The artifact must serve exactly the declared inputs and outputs (names, datatypes, shapes)."""
        problems = []
        if self.max_batch > manifest.max_batch:
            problems.append(f"max_batch: {self.max_batch} exceeds what the model was exported for ({manifest.max_batch})")
        for key, decls, specs in (("inputs", self.inputs, manifest.inputs), ("outputs", self.outputs, manifest.outputs)):
            if [d.name for d in decls] != [s.name for s in specs]:
                problems.append(f"{key}: declared {[d.name for d in decls]}, the model has {[s.name for s in specs]}")
                continue
            for i, (d, s) in enumerate(zip(decls, specs)):
                if d.datatype != datatype_of(dtype_from_name(s.dtype)):
                    problems.append(f"{key}[{i}].datatype: declared {d.datatype}, the model has "
                                    f"{datatype_of(dtype_from_name(s.dtype))}")
                if tuple(d.shape) != tuple(s.shape):
                    problems.append(f"{key}[{i}].shape: declared {list(d.shape)}, the model has {list(s.shape)}")
        if problems:
            raise SpecError(problems)

    @classmethod
    def from_dict(cls, raw: Any, source: str = SPEC_FILE) -> FunctionSpec:
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise SpecError(["the document must be a mapping of fields"], source)
        known = {"name", "model", "slo_ms", "max_batch", "inputs", "outputs", "late_policy", "max_queue", "handler"}
        for k in sorted(set(raw) - known):
            problems.append(f"{k}: unknown field (known: {', '.join(sorted(known))})")
        name = raw.get("name")
        try:
            check_name(name)
        except SpecError as e:
            problems += e.problems
        model = _model(raw.get("model"), problems)
        slo = _number(raw, "slo_ms", problems, required=True, minimum=1.0)
        max_batch = int(_number(raw, "max_batch", problems, default=1, minimum=1, integer=True, maximum=1024))
        max_queue = int(_number(raw, "max_queue", problems, default=64, minimum=1, integer=True, maximum=100_000))
        late = raw.get("late_policy", "refuse")
        if late not in ("refuse", "serve"):
            problems.append(f"late_policy: {late!r} is not 'refuse' or 'serve'")
        inputs = _tensors(raw.get("inputs"), "inputs", problems)
        outputs = _tensors(raw.get("outputs"), "outputs", problems)
        handler = raw.get("handler")
        if handler is not None and (not isinstance(handler, str) or not handler.endswith(".py")
                                    or Path(handler).is_absolute() or ".." in Path(handler).parts):
            problems.append(f"handler: {handler!r} must be a relative path to a .py file inside the function directory")
        if problems:
            raise SpecError(problems, source)
        assert model is not None
        return cls(str(name), model, float(slo), max_batch, inputs, outputs, late, max_queue, handler)  # type: ignore[arg-type]


def load_spec(directory: str | Path) -> FunctionSpec:
    """Read and check ``DIR/function.yaml``."""
    import yaml

    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise SpecError([f"no {SPEC_FILE} in {directory}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"]) from None
    return FunctionSpec.from_dict(raw)


def _number(raw: dict[str, Any], key: str, problems: list[str], *, required: bool = False, default: float | None = None,
            minimum: float | None = None, maximum: float | None = None, integer: bool = False) -> float:
    if key not in raw:
        if required:
            problems.append(f"{key}: required")
        return default if default is not None else 0.0
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        problems.append(f"{key}: {v!r} is not {'an integer' if integer else 'a number'}")
        return default or 0.0
    if minimum is not None and v < minimum:
        problems.append(f"{key}: must be at least {minimum:g}")
    if maximum is not None and v > maximum:
        problems.append(f"{key}: must be at most {maximum:g}")
    return float(v)


def _model(raw: Any, problems: list[str]) -> ModelSource | None:
    if not isinstance(raw, dict):
        problems.append("model: required, a mapping with one of zoo, python, artifact")
        return None
    sources = [k for k in ("zoo", "python", "artifact") if k in raw]
    extra = set(raw) - {"zoo", "python", "artifact", "dtype", "seed"}
    for k in sorted(extra):
        problems.append(f"model.{k}: unknown field")
    if len(sources) != 1:
        problems.append("model: give exactly one of zoo, python, artifact")
        return None
    kind = sources[0]
    ref = raw[kind]
    if not isinstance(ref, str) or not ref:
        problems.append(f"model.{kind}: must be a non-empty string")
        return None
    if kind == "python" and not re.match(r"^[\w./-]+\.py:[A-Za-z_]\w*$", ref):
        problems.append(f"model.python: {ref!r} must look like 'model.py:build'")
    if kind in ("python", "artifact") and (Path(ref.split(":")[0]).is_absolute() or ".." in Path(ref).parts):
        problems.append(f"model.{kind}: {ref!r} must be a relative path inside the function directory")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"model.dtype: {dtype!r} is not float32, float16 or bfloat16")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append("model.seed: must be an integer")
        seed = 0
    return ModelSource(kind, ref, dtype, seed)


def _tensors(raw: Any, key: str, problems: list[str]) -> tuple[TensorDecl, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{key}: required, a non-empty list of {{name, datatype, shape}}")
        return ()
    out = []
    seen: set[str] = set()
    for i, t in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{where}: must be a mapping with name, datatype, shape")
            continue
        name, dt, shape = t.get("name"), t.get("datatype"), t.get("shape")
        ok = True
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][\w.-]{0,63}$", name or ""):
            problems.append(f"{where}.name: {name!r} is not a valid tensor name")
            ok = False
        elif name in seen:
            problems.append(f"{where}.name: {name!r} appears twice")
            ok = False
        if dt not in DATATYPES:
            problems.append(f"{where}.datatype: {dt!r} is not one of {', '.join(DATATYPES)}")
            ok = False
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or any(d < -1 or d == 0 for d in shape) or -1 in shape[1:]):
            problems.append(f"{where}.shape: {shape!r} must be a list of positive integers, -1 allowed first (batch)")
            ok = False
        if ok:
            seen.add(name)
            out.append(TensorDecl(name, dt, tuple(shape)))
    return tuple(out)


__all__ = ["FunctionSpec", "ModelSource", "SPEC_FILE", "SpecError", "TensorDecl", "check_name", "load_spec"]
