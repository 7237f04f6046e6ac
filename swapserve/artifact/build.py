"""Build a model artifact from a PyTorch module: the client-side step of a deploy.

The tenant's model code runs here (on the client), never on a worker. The result is a directory
(see :mod:`swapserve.artifact.manifest`) written atomically: a failed build leaves nothing behind.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from swapserve.artifact.manifest import (
    EXAMPLES_FILE,
    MANIFEST_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    Manifest,
    TensorSpec,
    WeightSpec,
    dtype_name,
)
from swapserve.errors import ArtifactError, ExportError

log = logging.getLogger(__name__)

FALLBACK_HINT = (
    "If the model cannot be exported (e.g. data-dependent control flow), ship it as a known "
    "architecture plus safetensors weights: see docs/artifacts.md, 'The fallback'."
)


def build_artifact(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    max_batch: int = 1,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Export ``module`` with torch.export and write an artifact to ``out_dir``.

    With ``max_batch > 1`` the batch dimension (dim 0 of every input) is exported as dynamic.
    """
    module = module.eval()
    examples = tuple(example_inputs)
    _check_examples(examples)
    ep, max_batch = _export(module, examples, name, max_batch)
    _check_signature(ep, name)
    weights, order, aliases = _weights_in_first_use_order(ep)
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    in_names = list(input_names) if input_names else [s.arg.name for s in user_inputs]
    inputs = tuple(TensorSpec(n, dtype_name(x.dtype), _batch_shape(x.shape, max_batch > 1), bound)
                   for n, x, bound in zip(in_names, examples, _index_bounds(module, examples)))
    outputs = _output_specs(ep, name, output_names, max_batch > 1)
    manifest = Manifest(
        name=name,
        kind="exported",
        inputs=inputs,
        outputs=outputs,
        weights=tuple(WeightSpec(n, dtype_name(weights[n].dtype), tuple(weights[n].shape)) for n in order),
        aliases=aliases,
        max_batch=max_batch,
        torch_version=torch.__version__,
    )
    manifest.validate()
    with _staging(Path(out_dir), overwrite) as staging:
        (staging / PROGRAM_FILE).write_bytes(_serialize_program(ep))
        _write_weights(staging / WEIGHTS_FILE, {n: weights[n] for n in order})
        _write_examples(staging / EXAMPLES_FILE, inputs, examples)
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def build_architecture_artifact(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    architecture: str,
    config: dict[str, Any],
    max_batch: int = 1,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """The fallback: a known architecture (see :mod:`swapserve.artifact.architectures`) plus weights.

    ``module`` must be that architecture built from ``config`` and carrying the weights to ship.
    The first-use order is recorded by running it once on ``example_inputs``.
    """
    from swapserve.artifact import architectures

    if architecture not in architectures.names():
        raise ArtifactError(f"unknown architecture {architecture!r} (known: {', '.join(architectures.names())})")
    module = module.eval()
    examples = tuple(example_inputs)
    _check_examples(examples)
    state, aliases = _module_state(module)
    order = _module_first_use(module, examples, state, aliases)
    with torch.no_grad():
        out = module(*examples)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ExportError(f"{name}: forward must return a tensor or a tuple of tensors")
    in_names = list(input_names) if input_names else [f"input_{i}" for i in range(len(examples))]
    out_names = list(output_names) if output_names else _default_output_names(len(outs))
    dyn = max_batch > 1
    manifest = Manifest(
        name=name,
        kind="architecture",
        inputs=tuple(TensorSpec(n, dtype_name(x.dtype), _batch_shape(x.shape, dyn), bound)
                     for n, x, bound in zip(in_names, examples, _index_bounds(module, examples))),
        outputs=tuple(TensorSpec(n, dtype_name(o.dtype), _batch_shape(o.shape, dyn)) for n, o in zip(out_names, outs)),
        weights=tuple(WeightSpec(n, dtype_name(state[n].dtype), tuple(state[n].shape)) for n in order),
        aliases=aliases,
        max_batch=max_batch,
        architecture={"name": architecture, "config": config},
        torch_version=torch.__version__,
    )
    manifest.validate()
    with _staging(Path(out_dir), overwrite) as staging:
        _write_weights(staging / WEIGHTS_FILE, {n: state[n] for n in order})
        _write_examples(staging / EXAMPLES_FILE, manifest.inputs, examples)
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


# --- export -------------------------------------------------------------------------------------


def _check_examples(examples: tuple[Any, ...]) -> None:
    if not examples or not all(isinstance(x, torch.Tensor) for x in examples):
        raise ArtifactError("example inputs must be a non-empty sequence of tensors")


def _export(module: nn.Module, examples: tuple[torch.Tensor, ...], name: str, max_batch: int) -> tuple[ExportedProgram, int]:
    """Export with a dynamic batch dimension when asked; fall back to the example's static batch."""
    with torch.no_grad():
        if max_batch > 1:
            # A batch of 1 would be specialised by export (0/1 specialisation): trace with 2.
            traced = tuple(x if x.shape[0] > 1 else torch.cat([x, x]) for x in examples)
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            try:
                ep = torch.export.export(module, traced, dynamic_shapes=tuple({0: batch} for _ in traced))
                return ep, max_batch
            except Exception as e:  # noqa: BLE001 - any export failure: retry with a static batch
                log.warning("%s: dynamic batch export failed (%s: %s); exporting with a static batch of %d",
                            name, type(e).__name__, str(e).splitlines()[0][:200], examples[0].shape[0])
        try:
            return torch.export.export(module, examples), int(examples[0].shape[0])
        except Exception as e:  # noqa: BLE001 - report every export failure with its cause
            first = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
            raise ExportError(f"torch.export could not capture {name}: {type(e).__name__}: {first}. {FALLBACK_HINT}") from e


def _check_signature(ep: ExportedProgram, name: str) -> None:
    sig = ep.graph_signature
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise ExportError(f"{name}: the model mutates its state during forward ({spec.kind.name} {spec.target}); "
                              "served models must be pure functions of their inputs (call .eval(), avoid in-place "
                              "updates of buffers)")
    for node in ep.graph.nodes:  # recent torch.export keeps in-place updates as in-place ops
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for arg_schema, arg in zip(schema.arguments, (*node.args, *(node.kwargs.get(a.name) for a in
                                                                    schema.arguments[len(node.args):]))):
            info = arg_schema.alias_info
            if info is not None and info.is_write and getattr(arg, "op", None) == "placeholder":
                raise ExportError(f"{name}: the model mutates its state: it updates {arg.name!r} in place during forward ({node.target}); "
                                  "served models must be pure functions of their inputs (call .eval(), avoid in-place "
                                  "updates of buffers and inputs)")
    for spec in sig.input_specs:
        if spec.kind == InputKind.CUSTOM_OBJ:
            raise ExportError(f"{name}: custom objects ({spec.target}) are not supported")
        if spec.kind == InputKind.USER_INPUT and not isinstance(spec.arg, torch.export.graph_signature.TensorArgument):
            raise ExportError(f"{name}: every model input must be a tensor ({spec.arg} is not)")


def _state_tensor(ep: ExportedProgram, spec: Any) -> torch.Tensor:
    if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
        return ep.state_dict[spec.target]
    return ep.constants[spec.target]


def _weights_in_first_use_order(ep: ExportedProgram) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Distinct state tensors, the order in which the graph first reads them, and tied-weight aliases."""
    by_placeholder: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            by_placeholder[spec.arg.name] = spec.target
            tensors[spec.target] = _state_tensor(ep, spec).detach()
    seen: list[str] = []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            continue
        for inp in node.all_input_nodes:
            target = by_placeholder.get(inp.name)
            if target is not None and target not in seen:
                seen.append(target)
    seen += [t for t in tensors if t not in seen]  # never read: still part of the program's inputs
    return _dedup(tensors, seen)


def _dedup(tensors: dict[str, torch.Tensor], order: list[str]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    canonical: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    unique: list[str] = []
    for n in order:
        t = tensors[n]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in canonical:
            aliases[n] = canonical[key]
        else:
            canonical[key] = n
            unique.append(n)
    return tensors, unique, aliases


def _batch_shape(shape: Sequence[Any], dynamic: bool) -> tuple[int, ...]:
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, torch.SymInt) or (dynamic and i == 0):
            dims.append(-1)
        else:
            dims.append(int(d))
    return tuple(dims)


def _default_output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _output_specs(ep: ExportedProgram, name: str, names: Sequence[str] | None, dynamic: bool) -> tuple[TensorSpec, ...]:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = []
    for arg in out_node.args[0]:
        val = getattr(arg, "meta", {}).get("val") if arg is not None else None
        if not isinstance(val, torch.Tensor):
            raise ExportError(f"{name}: every model output must be a tensor")
        vals.append(val)
    out_names = list(names) if names else _default_output_names(len(vals))
    if len(out_names) != len(vals):
        raise ArtifactError(f"{len(out_names)} output names given for {len(vals)} outputs")
    return tuple(TensorSpec(n, dtype_name(v.dtype), _batch_shape(v.shape, dynamic)) for n, v in zip(out_names, vals))


def _serialize_program(ep: ExportedProgram) -> bytes:
    """The program alone: weights go to safetensors, so nothing here needs unpickling to load."""
    from torch._export.serde.serialize import serialize

    wanted = {"serialize_state_dict": False, "serialize_constants": False, "serialize_example_inputs": False}
    params = inspect.signature(serialize).parameters
    return serialize(ep, **{k: v for k, v in wanted.items() if k in params}).exported_program


# --- the fallback's module state ----------------------------------------------------------------


def _module_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        tensors[n] = p.detach()
    for n, b in module.named_buffers(remove_duplicate=False):
        tensors[n] = b.detach()
    _, unique, aliases = _dedup(tensors, list(tensors))
    return {n: tensors[n] for n in unique}, aliases


def _index_bounds(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> list[int | None]:
    """Per example input, the rows of the smallest table it indexes directly — an ``nn.Embedding`` or
    ``nn.EmbeddingBag`` given that input or a view of it — seen with forward pre-hooks on one run; None
    where it indexes none (floating-point inputs, or integer ones the model uses otherwise)."""
    tables = [m for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    ints = [i for i, x in enumerate(examples) if not x.is_floating_point() and x.dtype != torch.bool and x.numel()]
    bounds: list[int | None] = [None] * len(examples)
    if not tables or not ints:
        return bounds
    storages = {i: examples[i].untyped_storage().data_ptr() for i in ints}

    def hook(m: nn.Module, args: Any) -> None:
        idx = args[0] if args else None
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or not idx.numel():
            return
        for i, ptr in storages.items():
            if idx.untyped_storage().data_ptr() == ptr:
                rows = int(m.num_embeddings)
                bounds[i] = rows if bounds[i] is None else min(bounds[i], rows)  # type: ignore[type-var]

    _run_hooked(module, examples, [m.register_forward_pre_hook(hook) for m in tables])
    return bounds


def _run_hooked(module: nn.Module, examples: tuple[torch.Tensor, ...], hooks: list[Any]) -> None:
    """One run of ``module`` on ``examples`` with ``hooks`` in place; they are removed whatever happens."""
    try:
        with torch.no_grad():
            module(*examples)
    finally:
        for h in hooks:
            h.remove()


def _module_first_use(module: nn.Module, examples: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor],
                      aliases: dict[str, str]) -> list[str]:
    """Order in which submodules that own tensors run, recorded with forward pre-hooks."""
    order: list[str] = []
    hooks = []
    for mod_name, mod in module.named_modules():
        own = [f"{mod_name}.{n}" if mod_name else n for n, _ in (*mod.named_parameters(recurse=False),
                                                                 *mod.named_buffers(recurse=False))]
        if not own:
            continue

        def hook(_m: nn.Module, _args: Any, own: list[str] = own) -> None:
            for n in own:
                n = aliases.get(n, n)
                if n not in order:
                    order.append(n)

        hooks.append(mod.register_forward_pre_hook(hook))
    _run_hooked(module, examples, hooks)
    return order + [n for n in state if n not in order]


# --- writing ------------------------------------------------------------------------------------


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for n, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses shared storage: give this one its own
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[n] = t
    safetensors.torch.save_file(out, str(path), metadata={"format": "pt"})


def _write_examples(path: Path, inputs: Sequence[TensorSpec], examples: Sequence[torch.Tensor]) -> None:
    safetensors.torch.save_file({s.name: x[:1].contiguous().clone() for s, x in zip(inputs, examples)}, str(path))


class _staging:
    """Write into a hidden sibling directory; rename into place only when everything is written."""

    def __init__(self, out_dir: Path, overwrite: bool):
        self.out_dir = out_dir
        self.overwrite = overwrite
        self.tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        if self.out_dir.exists() and not self.overwrite:
            raise ArtifactError(f"{self.out_dir} already exists (pass overwrite=True to replace it)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
