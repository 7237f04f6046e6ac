"""A function's manifest, ``function.yaml``: what is served, under which name and SLO.

    name: resnet50                  # lowercase letters, digits, '-' and '_'; starts with a letter or digit
    model:                          # exactly one source:
      zoo: resnet50                 #   a zoo model with seeded random weights (+ seed, dtype)
      # python: model.py:build      #   a function returning (module, example_inputs), run on the client
      # artifact: artifact/         #   a prebuilt artifact directory
      dtype: float16                # optional cast for zoo/python sources
    # models:                       # or several named models (a handler calls them as models["encoder"]):
    #   encoder: {python: encoder.py:build, inputs: [...], outputs: [...]}   # I/O optional: names the
    #   scorer: {zoo: resnet50}                                              # model's tensors, checked
    slo_ms: 100                     # latency objective of one request, end to end
    max_batch: 8                    # requests of this function batched up to this size
    late_policy: refuse             # refuse (503 + Retry-After) or serve a request that will miss its SLO
    max_queue: 64                   # queued requests beyond which new ones get 429
    inputs:  [{name: input, datatype: FP32, shape: [-1, 3, 224, 224]}]    # -1: the batch dimension
    outputs: [{name: logits, datatype: FP32, shape: [-1, 1000]}]
    handler: handler.py             # optional tenant code (run in a sandbox)
    sandbox: {timeout_s: 30, memory_mb: 1024, max_sandboxes: 2}   # optional, with a handler only

``model:`` is the one-model form: its model is named ``model`` (``models["model"]`` in a handler). Without
a handler a function has exactly one model and its inputs/outputs are the model's; with a handler they
are the handler's, and each model's are its artifact's (optionally declared under the model, then
checked). Every problem is reported at once, each with the field it concerns.
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


DEFAULT_MODEL = "model"
"""The name of the model of the one-model form (``model:``)."""
MODEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,31}$")
MAX_MODELS = 8


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["zoo", "python", "artifact"]
    ref: str
    """Zoo name, ``file.py:function``, or an artifact directory relative to the function directory."""
    dtype: str | None = None
    seed: int = 0
    inputs: tuple[TensorDecl, ...] = ()
    """Optional: the model's own inputs (names given at export, then checked against the artifact)."""
    outputs: tuple[TensorDecl, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {self.kind: self.ref}
        if self.dtype is not None:
            d["dtype"] = self.dtype
        if self.kind == "zoo":
            d["seed"] = self.seed
        if self.inputs:
            d["inputs"] = [t.to_dict() for t in self.inputs]
        if self.outputs:
            d["outputs"] = [t.to_dict() for t in self.outputs]
        return d


@dataclass(frozen=True)
class SandboxSettings:
    """Per-function limits of the handler's sandboxes (``sandbox:`` in function.yaml)."""

    timeout_s: float = 30.0
    """A request's whole handler run, from arrival; past it: 504 and the sandbox is replaced."""
    memory_mb: int = 1024
    """Memory the handler may allocate in one sandbox; past it: 500 and the sandbox is replaced."""
    max_sandboxes: int = 2
    """Sandboxes running at once; further requests wait for one."""


def artifact_dir(model: str) -> str:
    """Where model ``model``'s artifact lies inside a bundle: ``artifact/`` for the one-model form's model
    (as bundles always had), ``models/<name>/`` for the others."""
    return "artifact" if model == DEFAULT_MODEL else f"models/{model}"


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    models: dict[str, ModelSource]
    """By name, in declaration order; ``{"model": ...}`` for the one-model form."""
    slo_ms: float
    max_batch: int = 1
    inputs: tuple[TensorDecl, ...] = ()
    outputs: tuple[TensorDecl, ...] = ()
    late_policy: Literal["refuse", "serve"] = "refuse"
    max_queue: int = 64
    handler: str | None = None
    sandbox: SandboxSettings | None = None
    """With a handler: its sandboxes' limits (defaults if not given)."""

    @property
    def model(self) -> ModelSource:
        """The model of a one-model function."""
        if len(self.models) != 1:
            raise AttributeError(f"{self.name} has {len(self.models)} models; use .models")
        return next(iter(self.models.values()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        del d["models"]
        if list(self.models) == [DEFAULT_MODEL]:
            head = {"name": self.name, "model": self.models[DEFAULT_MODEL].to_dict()}
        else:
            head = {"name": self.name, "models": {n: m.to_dict() for n, m in self.models.items()}}
        return {**head, **{k: v for k, v in d.items() if v is not None}}

    def check_against(self, manifests: dict[str, Manifest]) -> None:
        """Each artifact must serve its model's declared inputs and outputs (if declared) and the batch; without
        a handler, the function's own inputs and outputs are its one model's."""
        problems = []
        for name, manifest in manifests.items():
            where = "model" if list(self.models) == [DEFAULT_MODEL] else f"models.{name}"
            if self.max_batch > manifest.max_batch:
                problems.append(f"max_batch: {self.max_batch} exceeds what {where} was exported for "
                                f"({manifest.max_batch})")
            src = self.models[name]
            if src.inputs:
                problems += _io_problems(f"{where}.inputs", src.inputs, manifest.inputs)
            if src.outputs:
                problems += _io_problems(f"{where}.outputs", src.outputs, manifest.outputs)
            if self.handler is None:
                problems += _io_problems("inputs", self.inputs, manifest.inputs)
                problems += _io_problems("outputs", self.outputs, manifest.outputs)
        if problems:
            raise SpecError(problems)

    @classmethod
    def from_dict(cls, raw: Any, source: str = SPEC_FILE) -> FunctionSpec:
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise SpecError(["the document must be a mapping of fields"], source)
        known = {"name", "model", "models", "slo_ms", "max_batch", "inputs", "outputs", "late_policy", "max_queue",
                 "handler", "sandbox"}
        for k in sorted(set(raw) - known):
            problems.append(f"{k}: unknown field (known: {', '.join(sorted(known))})")
        name = raw.get("name")
        try:
            check_name(name)
        except SpecError as e:
            problems += e.problems
        models = _models(raw, problems)
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
        if handler is None and len(models) > 1:
            problems.append(f"models: {len(models)} models need a handler to call them (without one a function "
                            "is exactly one model)")
        sandbox = _sandbox(raw.get("sandbox"), handler is not None, problems)
        if problems:
            raise SpecError(problems, source)
        return cls(str(name), models, float(slo), max_batch, inputs, outputs, late, max_queue, handler,  # type: ignore[arg-type]
                   sandbox)


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


def _io_problems(key: str, decls: tuple[TensorDecl, ...], specs: tuple[Any, ...]) -> list[str]:
    """Declared tensors against an artifact's (names, datatypes, shapes)."""
    if [d.name for d in decls] != [s.name for s in specs]:
        return [f"{key}: declared {[d.name for d in decls]}, the model has {[s.name for s in specs]}"]
    problems = []
    for i, (d, s) in enumerate(zip(decls, specs)):
        if d.datatype != datatype_of(dtype_from_name(s.dtype)):
            problems.append(f"{key}[{i}].datatype: declared {d.datatype}, the model has "
                            f"{datatype_of(dtype_from_name(s.dtype))}")
        if tuple(d.shape) != tuple(s.shape):
            problems.append(f"{key}[{i}].shape: declared {list(d.shape)}, the model has {list(s.shape)}")
    return problems


def _models(raw: dict[str, Any], problems: list[str]) -> dict[str, ModelSource]:
    """``model:`` (one model, named ``model``) or ``models:`` (several, by name): exactly one of them."""
    if ("model" in raw) == ("models" in raw):
        problems.append("model: required (or models: for several named models), not both")
        return {}
    if "model" in raw:
        src = _model(raw["model"], "model", problems)
        return {DEFAULT_MODEL: src} if src is not None else {}
    named = raw["models"]
    if not isinstance(named, dict) or not named:
        problems.append("models: must be a non-empty mapping of model names to sources")
        return {}
    if len(named) > MAX_MODELS:
        problems.append(f"models: at most {MAX_MODELS} models per function, not {len(named)}")
    out = {}
    for name, body in named.items():
        if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
            problems.append(f"models: {name!r} is not a valid model name (letters, digits, '_', '-'; 1-32 "
                            "characters; starting with a letter or '_')")
            continue
        src = _model(body, f"models.{name}", problems)
        if src is not None:
            out[name] = src
    return out


def _model(raw: Any, where: str, problems: list[str]) -> ModelSource | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: required, a mapping with one of zoo, python, artifact")
        return None
    sources = [k for k in ("zoo", "python", "artifact") if k in raw]
    extra = set(raw) - {"zoo", "python", "artifact", "dtype", "seed", "inputs", "outputs"}
    for k in sorted(extra):
        problems.append(f"{where}.{k}: unknown field")
    if len(sources) != 1:
        problems.append(f"{where}: give exactly one of zoo, python, artifact")
        return None
    kind = sources[0]
    ref = raw[kind]
    if not isinstance(ref, str) or not ref:
        problems.append(f"{where}.{kind}: must be a non-empty string")
        return None
    if kind == "python" and not re.match(r"^[\w./-]+\.py:[A-Za-z_]\w*$", ref):
        problems.append(f"{where}.python: {ref!r} must look like 'model.py:build'")
    if kind in ("python", "artifact") and (Path(ref.split(":")[0]).is_absolute() or ".." in Path(ref).parts):
        problems.append(f"{where}.{kind}: {ref!r} must be a relative path inside the function directory")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"{where}.dtype: {dtype!r} is not float32, float16 or bfloat16")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"{where}.seed: must be an integer")
        seed = 0
    inputs = _tensors(raw["inputs"], f"{where}.inputs", problems) if "inputs" in raw else ()
    outputs = _tensors(raw["outputs"], f"{where}.outputs", problems) if "outputs" in raw else ()
    return ModelSource(kind, ref, dtype, seed, inputs, outputs)


def _sandbox(raw: Any, has_handler: bool, problems: list[str]) -> SandboxSettings | None:
    if raw is None:
        return SandboxSettings() if has_handler else None
    if not has_handler:
        problems.append("sandbox: only a function with a handler has sandboxes")
        return None
    if not isinstance(raw, dict):
        problems.append("sandbox: must be a mapping (timeout_s, memory_mb, max_sandboxes)")
        return None
    for k in sorted(set(raw) - {"timeout_s", "memory_mb", "max_sandboxes"}):
        problems.append(f"sandbox.{k}: unknown field (known: max_sandboxes, memory_mb, timeout_s)")
    n = len(problems)
    timeout = _number(raw, "timeout_s", problems, default=30.0, minimum=0.01, maximum=3600)
    memory = _number(raw, "memory_mb", problems, default=1024, minimum=16, maximum=65536, integer=True)
    most = _number(raw, "max_sandboxes", problems, default=2, minimum=1, maximum=64, integer=True)
    problems[n:] = [f"sandbox.{p}" for p in problems[n:]]
    return SandboxSettings(timeout, int(memory), int(most))


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


__all__ = ["DEFAULT_MODEL", "FunctionSpec", "ModelSource", "SPEC_FILE", "SandboxSettings", "SpecError", "TensorDecl",
           "artifact_dir", "check_name", "load_spec"]
