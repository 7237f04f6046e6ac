"""The runnable form of a model on one device, with its weights bound to fixed device addresses.

A program is built once per (model, device). Its weights are views into the model's fixed virtual
range, so the same program (and any CUDA graph captured from it) runs whatever physical pages
currently back that range. Two variants run the same kernels: the plain one (for a resident model:
no waits at all) and the pipelined one, which before the first use of each weight waits for the
copy chunk holding it.

Exported programs are deserialized from JSON with weights supplied separately (nothing is
unpickled). Architecture artifacts (the fallback) are rebuilt from swapserve's own code.
"""

from __future__ import annotations

import hashlib
import operator
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from swapserve.artifact.load import Artifact
from swapserve.artifact.manifest import Manifest, dtype_from_name
from swapserve.engine.backend.base import Waiter
from swapserve.errors import ArtifactError


class Program(ABC):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    @abstractmethod
    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        """Point the program at its weights (views at the model's fixed device addresses)."""

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor], waiter: Waiter | None = None) -> list[torch.Tensor]:
        """Run the forward pass; with a waiter, wait for each weight's chunk before its first use."""

    @abstractmethod
    def activation_bytes(self, batch: int) -> int | None:
        """Estimated peak bytes of intermediate tensors at this batch size (None: unknown until run)."""


def load_program(artifact: Artifact, device: torch.device, weight_chunk: dict[str, int]) -> Program:
    """``weight_chunk``: for each weight (by manifest name), the copy chunk holding its last byte."""
    if artifact.manifest.kind == "exported":
        return ExportedProgram(artifact, device, weight_chunk)
    return ModuleProgram(artifact, device, weight_chunk)


def _wait(waiter: Waiter, chunk: int) -> None:
    waiter.wait(chunk)


# --- exported programs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compiled:
    """What every model with the same program shares: the graph modules (pure code, weights are arguments)."""

    targets: tuple[str, ...]
    """State name of each leading placeholder."""
    plain: fx.GraphModule
    pipelined: fx.GraphModule
    peak_bytes: dict[int, int] = field(default_factory=dict)
    """Activation peak per batch size (a walk of the graph: worth computing once, not per model)."""


_COMPILED: OrderedDict[tuple[Any, ...], _Compiled] = OrderedDict()
_COMPILED_MAX = 64
_compiled_lock = threading.Lock()


def _compiled(artifact: Artifact, device: torch.device, weight_chunk: dict[str, int]) -> _Compiled:
    """Deserializing a program costs ~0.1-1 s; hundreds of functions built from a few architectures
    (distinct weights, same program) share one copy per (program, device, chunking)."""
    program = artifact.program_path.read_bytes()
    key = (hashlib.sha256(program).hexdigest(), str(device), tuple(sorted(weight_chunk.items())),
           tuple(sorted(artifact.manifest.aliases.items())))
    with _compiled_lock:
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
    ep = _deserialize(artifact, program)
    targets = tuple(spec.target for spec in ep.graph_signature.input_specs if spec.kind.name != "USER_INPUT")
    gm = ep.graph_module
    _retarget_device(gm, device)
    aliases = artifact.manifest.aliases
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    chunk_of = {ph.name: weight_chunk[aliases.get(t, t)] for ph, t in zip(placeholders, targets)}
    compiled = _Compiled(targets, gm, _with_waits(gm, chunk_of))
    with _compiled_lock:
        _COMPILED[key] = compiled
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return compiled


class ExportedProgram(Program):
    def __init__(self, artifact: Artifact, device: torch.device, weight_chunk: dict[str, int]):
        super().__init__(artifact.manifest)
        c = _compiled(artifact, device, weight_chunk)
        self._targets = c.targets
        self._plain = c.plain
        self._pipelined = c.pipelined
        self._graph = c.plain.graph
        self._peak = c.peak_bytes
        self._args: list[torch.Tensor] = []

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        aliases = self.manifest.aliases
        self._args = [weights[aliases.get(t, t)] for t in self._targets]

    def run(self, inputs: Sequence[torch.Tensor], waiter: Waiter | None = None) -> list[torch.Tensor]:
        if waiter is None:
            out = self._plain(*self._args, *inputs)
        else:
            out = self._pipelined(waiter, *self._args, *inputs)
        return list(out)

    def activation_bytes(self, batch: int) -> int:
        peak = self._peak.get(batch)
        if peak is None:
            peak = self._peak[batch] = _peak_live_bytes(self._graph, batch)
        return peak


def _deserialize(artifact: Artifact, program: bytes) -> torch.export.ExportedProgram:
    """Rebuild the ExportedProgram from program.json, with meta tensors standing in for weights."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    m = artifact.manifest
    specs = {w.name: w for w in m.weights}
    meta = {n: torch.empty(w.shape, dtype=dtype_from_name(w.dtype), device="meta") for n, w in specs.items()}
    for alias, target in m.aliases.items():
        meta[alias] = meta[target]
    try:
        sep = _bytes_to_dataclass(schema.ExportedProgram, program)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad artifact
        raise ArtifactError(f"{artifact.program_path.name} is not a valid serialized program: {e}") from None
    state: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for spec in sep.graph_module.signature.input_specs:
        kind, value = spec.type, spec.value
        if kind == "parameter":
            state[value.parameter_name] = torch.nn.Parameter(_need(meta, value.parameter_name), requires_grad=False)
        elif kind == "buffer":
            (state if value.persistent else constants)[value.buffer_name] = _need(meta, value.buffer_name)
        elif kind == "tensor_constant":
            constants[value.tensor_constant_name] = _need(meta, value.tensor_constant_name)
        elif kind not in ("user_input",):
            raise ArtifactError(f"program input of kind {kind!r} is not supported")
    try:
        return ExportedProgramDeserializer().deserialize(sep, state, constants, None)
    except Exception as e:  # noqa: BLE001 - version skew or corrupt program
        raise ArtifactError(f"cannot load {artifact.program_path.name} (built with torch {m.torch_version}, "
                            f"running {torch.__version__}): {type(e).__name__}: {e}") from None


def _need(meta: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return meta[name]
    except KeyError:
        raise ArtifactError(f"the program reads weight {name!r} that the manifest does not list") from None


def _retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Point tensors the graph creates (arange, full, ...) at the device it runs on."""
    changed = False
    for node in gm.graph.nodes:
        if "device" in node.kwargs and node.kwargs["device"] is not None:
            node.kwargs = {**node.kwargs, "device": device}
            changed = True
        if node.op == "call_function" and node.target is torch.ops.aten.to.device:
            args = list(node.args)
            args[1] = device
            node.args = tuple(args)
            changed = True
    if changed:
        gm.recompile()


def _with_waits(gm: fx.GraphModule, chunk_of: dict[str, int]) -> fx.GraphModule:
    """A copy of ``gm`` taking a waiter first, waiting before each first use of a later chunk."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    waiter = None
    waited = -1
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if waiter is None:
                waiter = g.placeholder("swap_waiter")
            env[node] = g.node_copy(node, env.__getitem__)
            continue
        need = max((chunk_of[i.name] for i in node.all_input_nodes if i.name in chunk_of), default=-1)
        if need > waited:
            g.call_function(_wait, (waiter, need))
            waited = need
        env[node] = g.node_copy(node, env.__getitem__)
    return fx.GraphModule(gm, g)


_VIEW_FREE = {operator.getitem}


def _size_at(dim: Any, batch: int) -> int:
    if isinstance(dim, torch.SymInt):
        expr = dim.node.expr
        return int(expr.subs({s: batch for s in expr.free_symbols}))
    return int(dim)


def _nbytes_at(val: Any, batch: int) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    n = 1
    for d in val.shape:
        n *= _size_at(d, batch)
    return n * val.element_size()


def _aliases_input(node: fx.Node) -> bool:
    target = node.target
    if target in _VIEW_FREE:
        return True
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write


def _peak_live_bytes(graph: fx.Graph, batch: int) -> int:
    """Peak of the bytes held by intermediate tensors, walking the graph in execution order."""
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    base: dict[fx.Node, fx.Node] = {}
    size: dict[fx.Node, int] = {}
    last_use: dict[fx.Node, int] = {}
    for idx, n in enumerate(nodes):
        if _aliases_input(n) and n.all_input_nodes:
            src = n.all_input_nodes[0]
            base[n] = base.get(src, src)
        else:
            vals = n.meta.get("val")
            vals = vals if isinstance(vals, (tuple, list)) else (vals,)
            size[n] = sum(_nbytes_at(v, batch) for v in vals)
            base[n] = n
        for i in n.all_input_nodes:
            b = base.get(i, i)
            last_use[b] = idx
    outputs = {base.get(a, a) for o in graph.nodes if o.op == "output" for a in o.all_input_nodes}
    live = peak = 0
    frees: dict[int, list[fx.Node]] = {}
    for b, idx in last_use.items():
        if b in size and b not in outputs:
            frees.setdefault(idx, []).append(b)
    for idx, n in enumerate(nodes):
        if base[n] is n:
            live += size[n]
            peak = max(peak, live)
        for b in frees.get(idx, ()):
            live -= size[b]
    return peak


# --- the fallback: a known architecture ------------------------------------------------------------


class ModuleProgram(Program):
    def __init__(self, artifact: Artifact, device: torch.device, weight_chunk: dict[str, int]):
        from swapserve.artifact import architectures

        super().__init__(artifact.manifest)
        arch = artifact.manifest.architecture or {}
        with torch.device("meta"):
            self._module = architectures.build(arch["name"], arch.get("config", {}))
        self._module.requires_grad_(False)
        self._waiter: Waiter | None = None
        names = {n for n, _ in self._module.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in self._module.named_buffers(remove_duplicate=False)}
        known = {w.name for w in self.manifest.weights} | set(self.manifest.aliases)
        if names - known:
            missing = sorted(names - known)
            raise ArtifactError(f"weights lack {len(missing)} tensors of architecture {arch['name']!r}, e.g. "
                                f"{missing[:3]}")
        aliases = self.manifest.aliases
        for mod_name, mod in self._module.named_modules():
            own = [f"{mod_name}.{n}" if mod_name else n for n in (*mod._parameters, *mod._buffers)]
            if own:
                need = max(weight_chunk[aliases.get(n, n)] for n in own)
                mod.register_forward_pre_hook(self._hook(need))

    def _hook(self, chunk: int) -> Any:
        def hook(_m: nn.Module, _args: Any) -> None:
            if self._waiter is not None:
                self._waiter.wait(chunk)

        return hook

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        aliases = self.manifest.aliases
        for name in [w.name for w in self.manifest.weights] + list(aliases):
            mod_name, _, attr = name.rpartition(".")
            mod = self._module.get_submodule(mod_name)
            t = weights[aliases.get(name, name)]
            if attr in mod._parameters:
                mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[attr] = t

    def run(self, inputs: Sequence[torch.Tensor], waiter: Waiter | None = None) -> list[torch.Tensor]:
        self._waiter = waiter
        try:
            out = self._module(*inputs)
        finally:
            self._waiter = None
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def activation_bytes(self, batch: int) -> int | None:
        return None  # no graph to walk; measured when a CUDA graph is captured
