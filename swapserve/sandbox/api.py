"""What handler code sees: the request, the response it may return, and handles to its models.

A function's ``handler.py``::

    def setup():                        # optional: once per sandbox process, before its first request
        ...

    def handle(request, models):        # or ``async def handle``
        x = preprocess(request.inputs["image"])
        a = models["detector"](x)       # returns a ModelFuture at once: the call is already on its way
        b = models["classifier"](x)     # ... so both calls overlap
        return {"boxes": a.result()["boxes"], "label": b.result()["logits"].argmax(-1)}

See docs/handlers.md. This module is light on purpose: it is imported inside every sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from swapserve.artifact.manifest import dtype_from_name
from swapserve.tensors import datatype_of, fits_shape, names_differ, torch_dtype


@dataclass
class Request:
    """One request to the function."""

    inputs: dict[str, torch.Tensor]
    """Named CPU tensors (the OIP route); empty on the JSON route. Views of the sandbox's shared memory, valid
    until ``handle`` returns: ``.clone()`` what you keep beyond it."""
    parameters: dict[str, Any]
    """The request's parameters (a JSON object); empty if it had none."""
    json: Any = None
    """The request body on the JSON route (any JSON value); None on the tensor route."""
    is_json: bool = False
    deadline: float = 0.0
    """``time.monotonic()`` by which the response is due; the sandbox is killed soon after."""

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()


@dataclass
class Response:
    """A tensor response with parameters. Returning a plain ``dict[str, Tensor]`` means no parameters.
    On the JSON route, return any JSON value instead."""

    tensors: dict[str, torch.Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)


class ModelCallError(RuntimeError):
    """A model call failed: refused as overloaded, its inputs rejected, the model unavailable. Let it
    propagate and the request fails with the same status (503 with Retry-After for overload)."""

    def __init__(self, message: str, http_status: int = 500, call_id: int | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.call_id = call_id


class ModelInputError(ModelCallError, ValueError):
    """Inputs that do not match the model's signature (names, dtypes, shapes), raised at the call."""


class ModelFuture:
    """The outcome of one model call. ``result()`` blocks; ``await future`` in an ``async def handle``."""

    def __init__(self, model: str, call_id: int, wait: Callable[[Callable[[], bool], float | None], bool] | None = None):
        self.model = model
        self.call_id = call_id
        self._future: concurrent.futures.Future[dict[str, torch.Tensor]] = concurrent.futures.Future()
        self._wait = wait
        """The sandbox's channel: reads replies until ours is in (no reader thread to hand it over)."""

    def result(self, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """The model's outputs by name: CPU tensors viewing the sandbox's shared memory, each call's its own,
        valid until ``handle`` returns (``.clone()`` what you keep beyond it). Raises :class:`ModelCallError`,
        or ``TimeoutError`` after ``timeout`` seconds (the call goes on)."""
        if self._wait is not None and not self._future.done():
            self._wait(self._future.done, timeout)
        return self._future.result(0 if self._wait is not None else timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self) -> Generator[Any, None, dict[str, torch.Tensor]]:
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<ModelFuture {self.model!r} #{self.call_id} {state}>"


class _Transport(Protocol):
    def submit(self, model: str, inputs: dict[str, torch.Tensor]) -> ModelFuture: ...


class ModelHandle:
    """One of the function's models. ``handle(inputs)`` / ``handle.call(inputs)`` send the call and return
    a :class:`ModelFuture` without waiting. ``inputs`` maps input names to tensors; a model with one input
    also takes the bare tensor, and keyword arguments work too: ``handle(input_ids=ids)``."""

    def __init__(self, name: str, inputs: tuple[Any, ...], outputs: tuple[Any, ...], max_batch: int,
                 transport: _Transport):
        self.name = name
        self.inputs = inputs
        """Declared inputs (``name``, ``datatype``, ``shape``; -1 is the batch dimension)."""
        self.outputs = outputs
        self.max_batch = max_batch
        self._transport = transport

    def __call__(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None, /,
                 **named: torch.Tensor) -> ModelFuture:
        if isinstance(inputs, torch.Tensor):
            if len(self.inputs) != 1:
                raise ModelInputError(f"model {self.name!r} takes {len(self.inputs)} inputs "
                                      f"{[d.name for d in self.inputs]}; pass them by name", 400)
            given: dict[str, Any] = {self.inputs[0].name: inputs}
        else:
            given = dict(inputs or {})
        given.update(named)
        return self._transport.submit(self.name, self.check(given))

    call = __call__

    def check(self, given: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The inputs in declared order, contiguous, or a :class:`ModelInputError` naming what is wrong."""
        names = [d.name for d in self.inputs]
        if set(given) != set(names):
            raise ModelInputError(f"model {self.name!r} takes inputs {names}{names_differ(names, given)}", 400)
        out, batch = {}, None
        for d in self.inputs:
            x = given[d.name]
            if not isinstance(x, torch.Tensor):
                raise ModelInputError(f"model {self.name!r} input {d.name!r} must be a torch.Tensor, "
                                      f"not {type(x).__name__}", 400)
            if x.dtype != torch_dtype(d.datatype):
                got = datatype_of(x.dtype) if x.dtype in _KNOWN else str(x.dtype)
                raise ModelInputError(f"model {self.name!r} input {d.name!r} must be {d.datatype}, got {got}", 400)
            shape = tuple(x.shape)
            ok, batch = fits_shape(shape, d.shape, self.max_batch, batch)
            if not ok:
                raise ModelInputError(f"model {self.name!r} input {d.name!r} must have shape {list(d.shape)} "
                                      f"(-1: a batch of 1 to {self.max_batch}, the same for every input), "
                                      f"got {list(shape)}", 400)
            out[d.name] = x.detach().contiguous()
        return out

    def __repr__(self) -> str:
        return f"<ModelHandle {self.name!r} inputs={[d.name for d in self.inputs]}>"


_KNOWN = {dtype_from_name(n) for n in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                                       "int8", "uint8", "bool")}


class Models(Mapping[str, ModelHandle]):
    """The function's models by name: ``models["classifier"]``."""

    def __init__(self, handles: dict[str, ModelHandle]):
        self._handles = handles

    def __getitem__(self, name: str) -> ModelHandle:
        try:
            return self._handles[name]
        except KeyError:
            raise KeyError(f"no model {name!r}; this function has {sorted(self._handles)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)


__all__ = ["ModelCallError", "ModelFuture", "ModelHandle", "ModelInputError", "Models", "Request", "Response"]
