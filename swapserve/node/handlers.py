"""What the controller needs to serve a function through its handler: the names its models are scheduled
under, the signatures its handler's model handles check, its sandboxes' configuration, and the check of
what a handler returns on the tensor route.

A function without a handler is one model, scheduled under the function's own name (the path that has
always been there). A function with a handler has one scheduler entity per model, ``function/model`` —
each with its own queue, host-store copy and profile, and the function's SLO, batch size and queue bound —
and a pool of sandboxes that runs the handler; each model call the handler makes is a request of its
model's entity, due by the request's deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from swapserve.artifact import Artifact
from swapserve.config import MiB
from swapserve.functions.spec import FunctionSpec, SandboxSettings
from swapserve.sandbox import HandlerOutputError, ModelSignature, SandboxConfig
from swapserve.tensors import datatype_of, names_differ


def entity(spec: FunctionSpec, model: str) -> str:
    """The scheduler's name for one of ``spec``'s models: the function's name when it has no handler (its one
    model is the function), ``function/model`` otherwise (no function name holds a '/')."""
    return spec.name if spec.handler is None else f"{spec.name}/{model}"


def store_key(entity_name: str, suffix: str) -> str:
    """A host-store key for one loaded version of an entity (keys are file names: no '/')."""
    return f"{entity_name.replace('/', '.')}.{suffix}"


def signatures(spec: FunctionSpec, artifacts: Mapping[str, Artifact]) -> dict[str, ModelSignature]:
    """What each model handle accepts: the model's own tensors, batches up to the function's max_batch."""
    return {name: ModelSignature.of(art.manifest, spec.max_batch) for name, art in artifacts.items()}


def sandbox_config(base: SandboxConfig, spec: FunctionSpec) -> SandboxConfig:
    """The node's sandbox configuration with the function's own limits (``sandbox:`` in function.yaml)."""
    s = spec.sandbox or SandboxSettings()
    return replace(base, timeout_s=s.timeout_s, max_sandboxes=s.max_sandboxes, max_queue=spec.max_queue,
                   min_sandboxes=min(base.min_sandboxes, s.max_sandboxes),
                   limits=replace(base.limits, memory_bytes=s.memory_mb * MiB))


def check_outputs(spec: FunctionSpec, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A handler's tensor response must hold exactly the function's declared outputs, with their datatypes
    and shapes (-1: any size); otherwise the request fails with HandlerOutputError (500)."""
    declared = [d.name for d in spec.outputs]
    if set(outputs) != set(declared):
        raise HandlerOutputError(f"the handler of {spec.name!r} must return the outputs {declared}"
                                 f"{names_differ(declared, outputs)}")
    for d in spec.outputs:
        t = outputs[d.name]
        got = datatype_of(t.dtype)
        if got != d.datatype:
            raise HandlerOutputError(f"the handler of {spec.name!r} returned output {d.name!r} as {got}; "
                                     f"function.yaml declares {d.datatype}")
        shape = tuple(t.shape)
        if len(shape) != len(d.shape) or any(s != -1 and s != v for s, v in zip(d.shape, shape)):
            raise HandlerOutputError(f"the handler of {spec.name!r} returned output {d.name!r} of shape "
                                     f"{list(shape)}; function.yaml declares {list(d.shape)} (-1: any size)")
    return {name: outputs[name] for name in declared}


__all__ = ["check_outputs", "entity", "sandbox_config", "signatures", "store_key"]
