"""Build a deploy bundle from a function directory: the client-side half of ``swapserve deploy``.

    function_dir/                       out_dir/  (the bundle)
      function.yaml            ──►        function.yaml   normalised (spec.to_dict())
      model.py (python source)            artifact/       manifest.json, program.json, weights, examples
      encoder.py, scorer.py (models:)     models/<name>/  one artifact per further named model
      handler.py (optional)               handler.py      carried as is (runs later in a sandbox),
      helpers.py, vocab.txt, ...          ...             with the files beside it (functions.files)

Each model source is turned into an artifact here, where running the tenant's code is fine: a python
source's file is imported and called, a zoo model built with its seed, a prebuilt artifact copied and
checked. The artifacts must then serve what function.yaml declares. The bundle is written into a
hidden sibling and renamed into place at the end, so a failed build leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapserve.artifact import Manifest, build_artifact, load_artifact, zoo
from swapserve.artifact.manifest import dtype_from_name
from swapserve.errors import ArtifactError
from swapserve.functions.files import copy_handler_files, handler_files
from swapserve.functions.spec import SPEC_FILE, FunctionSpec, ModelSource, SpecError, TensorDecl, artifact_dir, load_spec

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def build_bundle(function_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 progress: Progress | None = None) -> FunctionSpec:
    """Check ``function_dir``'s function.yaml, build its artifact, and write the bundle to ``out_dir``.

    ``out_dir`` must not exist. ``progress`` receives one line per step (default: logged at INFO).
    Raises SpecError (naming the field) when the model does not match the declaration, ArtifactError
    or ExportError when the model cannot become an artifact.
    """
    say = progress or log.info
    src = Path(function_dir)
    out = Path(out_dir)
    if out.exists():
        raise ArtifactError(f"{out} already exists; give a new directory for the bundle")
    spec = load_spec(src)
    sources = ", ".join(f"{n}: {m.kind} {m.ref!r}" for n, m in spec.models.items())
    say(f"{spec.name}: function.yaml is valid ({sources})")
    _check_files(src, spec)  # cheap checks first: a missing handler should not cost a model export
    files = handler_files(src, spec)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        manifests = {name: _build_artifact(src, spec, name, m, tmp / artifact_dir(name), say)
                     for name, m in spec.models.items()}
        spec.check_against(manifests)
        copy_handler_files(src, files, tmp)
        (tmp / SPEC_FILE).write_text(_yaml(spec))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(m.nbytes for m in manifests.values())
    say(f"{spec.name}: bundle ready in {out} ({nbytes / 1e6:.1f} MB of weights"
        f"{f', {len(files)} handler files' if files else ''}, {time.perf_counter() - t0:.1f} s)")
    return spec


def _check_files(src: Path, spec: FunctionSpec) -> None:
    problems = []
    if spec.handler and not (src / spec.handler).is_file():
        problems.append(f"handler: {spec.handler!r} does not exist in {src}")
    for name, m in spec.models.items():
        where = _where(spec, name)
        kind, ref = m.kind, m.ref
        if kind == "python" and not (src / ref.split(":")[0]).is_file():
            problems.append(f"{where}.python: {ref.split(':')[0]!r} does not exist in {src}")
        if kind == "artifact" and not (src / ref).is_dir():
            problems.append(f"{where}.artifact: {ref!r} is not a directory in {src}")
        if kind == "zoo" and ref not in zoo.ZOO:
            problems.append(f"{where}.zoo: no zoo model {ref!r} (have: {', '.join(zoo.ZOO)})")
    if problems:
        raise SpecError(problems)


def _where(spec: FunctionSpec, name: str) -> str:
    """How function.yaml calls the model: ``model`` (the one-model form) or ``models.<name>``."""
    return "model" if list(spec.models) == [name] and name == "model" else f"models.{name}"


def _build_artifact(src: Path, spec: FunctionSpec, name: str, m: ModelSource, out: Path, say: Progress) -> Manifest:
    label = spec.name if len(spec.models) == 1 else f"{spec.name}/{name}"
    kind, ref = m.kind, m.ref
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "artifact":
        say(f"{label}: copying the prebuilt artifact {ref}")
        shutil.copytree(src / ref, out, symlinks=False)
        return load_artifact(out).manifest
    dtype = dtype_from_name(m.dtype) if m.dtype else None
    if kind == "zoo":
        z = zoo.get(ref)
        say(f"{label}: building zoo model {ref} ({m.dtype or 'float32'}, seed {m.seed})")
        module = z.build(dtype or torch.float32, m.seed)
        examples: tuple[torch.Tensor, ...] = z.example(1, dtype or torch.float32, m.seed)
    else:
        say(f"{label}: running {ref}")
        module, examples = _call_python_source(src, ref)
        if dtype is not None:
            module = module.to(dtype)
            examples = tuple(x.to(dtype) if x.is_floating_point() else x for x in examples)
    # Tensor names: the model's own declaration, else (no handler) the function's, else torch.export's.
    inputs, outputs = m.inputs, m.outputs
    if spec.handler is None:
        inputs, outputs = inputs or spec.inputs, outputs or spec.outputs
    _check_arity(label, _where(spec, name), inputs, outputs, module, examples)
    say(f"{label}: exporting with torch.export (max_batch {spec.max_batch}) ...")
    t0 = time.perf_counter()
    manifest = build_artifact(module, examples, out, name=label.replace("/", "."), max_batch=spec.max_batch,
                              input_names=[t.name for t in inputs] or None,
                              output_names=[t.name for t in outputs] or None)
    say(f"{label}: exported in {time.perf_counter() - t0:.1f} s")
    return manifest


def _call_python_source(src: Path, ref: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Import ``file.py`` by path and call the named function, which returns (module, example_inputs).

    The file is loaded by path, without putting its directory on sys.path: a tenant file named like a
    standard module (``tokenize.py``) would otherwise shadow it for every import that follows.
    """
    file, func_name = ref.split(":")
    path = src / file
    mod_name = f"_swapserve_fn_{uuid.uuid4().hex[:8]}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError([f"model.python: cannot load {file} as a Python module"])
    code = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(code)
    except Exception as e:
        raise ArtifactError(f"model.python: importing {file} failed: {type(e).__name__}: {e}") from e
    fn = getattr(code, func_name, None)
    if not callable(fn):
        raise SpecError([f"model.python: {file} has no function {func_name!r}"])
    try:
        result: Any = fn()
    except Exception as e:
        raise ArtifactError(f"model.python: {ref}() failed: {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ArtifactError(f"model.python: {ref}() must return (module, example_inputs), not {type(result).__name__}")
    module, examples = result
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if not isinstance(examples, (tuple, list)) or not examples or not all(isinstance(x, torch.Tensor) for x in examples):
        raise ArtifactError(f"model.python: {ref}() must return example_inputs as a tuple of tensors")
    return module, tuple(examples)


def _check_arity(label: str, where: str, inputs: tuple[TensorDecl, ...], outputs: tuple[TensorDecl, ...],
                 module: nn.Module, examples: tuple[torch.Tensor, ...]) -> None:
    """Count inputs and outputs before exporting: names are zipped onto them, and a count mismatch would
    otherwise silently drop a tensor (or fail deep inside the export). No names declared: nothing to count."""
    problems = []
    key = "" if where == "model" else f"{where}."
    if inputs and len(examples) != len(inputs):
        problems.append(f"{key}inputs: declared {len(inputs)} ({[t.name for t in inputs]}), "
                        f"the model takes {len(examples)}")
    elif outputs:
        module.eval()
        with torch.no_grad():
            try:
                out = module(*examples)
            except Exception as e:  # noqa: BLE001 - e.g. an fp16 kernel this CPU lacks: export may still work
                log.warning("%s: the model failed on its example inputs (%s: %s); letting torch.export decide",
                            label, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                return
        n_out = 1 if isinstance(out, torch.Tensor) else len(out) if isinstance(out, (tuple, list)) else -1
        if n_out < 0:
            raise ArtifactError(f"the model must return a tensor or a tuple of tensors, not {type(out).__name__}")
        if n_out != len(outputs):
            problems.append(f"{key}outputs: declared {len(outputs)} ({[t.name for t in outputs]}), "
                            f"the model returns {n_out}")
    if problems:
        raise SpecError(problems)


def _yaml(spec: FunctionSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)


def main(argv: list[str] | None = None) -> int:
    """``python -m swapserve.functions.build FUNCTION_DIR OUT_DIR``: :func:`build_bundle` in a process of its own
    (a node builds its demo functions so), each step a line on stdout; a failure's message on stderr, exit 1."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m swapserve.functions.build FUNCTION_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        build_bundle(args[0], args[1], progress=lambda line: print(line, flush=True))
    except (SpecError, ArtifactError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build_bundle"]

if __name__ == "__main__":
    raise SystemExit(main())
