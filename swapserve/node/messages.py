"""Messages between the controller and its worker processes (one per device).

Small typed records over a ``multiprocessing`` connection; tensor data never travels in them: it lies
in the worker's shared-memory IO slab (:mod:`swapserve.node.slab`) and messages carry
:class:`TensorRef` offsets. Every command carries an id; the worker answers each with exactly one
:class:`Reply`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True)
class TensorRef:
    offset: int
    """Byte offset in the IO slab."""
    dtype: str
    """Torch dtype name (``float16``)."""
    shape: tuple[int, ...]


# --- controller → worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class AddModel:
    id: int
    key: str
    """Host-store key of one version of a function's model."""
    artifact_path: str


@dataclass(frozen=True)
class RemoveModel:
    id: int
    key: str


@dataclass(frozen=True)
class Prepare:
    """Swap the model in once and capture its graphs for ``batches`` (deploy time, off the request path)."""

    id: int
    key: str
    batches: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Run:
    id: int
    key: str
    inputs: tuple[TensorRef, ...]
    out_offset: int
    """Where in the slab the worker may write outputs."""
    values: dict[str, float] = field(default_factory=dict)
    """Eviction values for the models on this device (the scheduler's expected reuse)."""
    lane: int = 0
    """The engine lane to run in (1: beside lane 0, for a model wholly on the device — or, with ``fetch``,
    one it brings in first; the worker moves it to lane 0 if the side lane cannot run it)."""
    out_limit: int | None = None
    """End of the lane's slab region: outputs must end before it (None: the slab's end)."""
    fetch: bool = False
    """A side lane brings the model's missing bytes in by kernel before it runs (``SwapEngine.infer``)."""


@dataclass(frozen=True)
class DropHost:
    """The owner spilled this model's host buffer: unmap it (once no run uses it)."""

    id: int
    key: str


@dataclass(frozen=True)
class Evict:
    id: int
    key: str


@dataclass(frozen=True)
class Prefetch:
    """Copy a model in ahead of its requests, or a piece of it (lane 0; answered with a RunResult that has
    no outputs)."""

    id: int
    key: str
    values: dict[str, float] = field(default_factory=dict)
    """Eviction values, as for :class:`Run`."""
    max_bytes: int | None = None
    """Copy only about this many of the missing bytes (whole pages, in first-use order); None: all."""


@dataclass(frozen=True)
class MeasureCopy:
    """Time ``nbytes`` of pinned host→device copies starting at wall-clock ``start_at`` (so that several
    workers copy at once), and execution of a fixed kernel with and without a concurrent copy."""

    id: int
    nbytes: int
    start_at: float
    exec_probe: bool = False


@dataclass(frozen=True)
class Stop:
    id: int


Command = AddModel | RemoveModel | Prepare | Run | Prefetch | DropHost | Evict | MeasureCopy | Stop


# --- worker → controller ------------------------------------------------------------------------


@dataclass(frozen=True)
class Residency:
    """The device's pool after a command: fraction of each model's pages present (1.0 = resident)."""

    present: dict[str, float]
    pool_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class RunResult:
    outputs: tuple[TensorRef, ...]
    wall_ms: float
    """Swap (if any) plus execution, as the worker timed it."""
    swapped: bool
    bytes_copied: int
    pages_taken: int = 0
    """Pages this run took from other models (evictions, partial or whole)."""
    handled_ms: float = 0.0
    """The worker's time for the command: message received to reply ready."""
    phases_ms: dict[str, float] = field(default_factory=dict)
    """Where a run's ``wall_ms`` went: ``wait`` (for the lane or a capture), ``upload`` (inputs), ``place``
    (pinning, evictions, remaps), ``device`` (launch to landed), ``output`` (into the IO slab)."""
    lane: int = 0
    """The lane it ran in (a side lane's run the worker handed to the first lane says 0)."""


@dataclass(frozen=True)
class CopyResult:
    h2d_GBps: float
    exec_ms: float = 0.0
    exec_copying_ms: float = 0.0


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    result: RunResult | CopyResult | None = None
    residency: Residency | None = None
    error: str = ""
    error_type: str = ""
    http_status: int = 500


@dataclass(frozen=True)
class Hello:
    """First message of a started worker."""

    device: str
    name: str
    pool_bytes: int
    h2d_GBps: float
    pid: int
    fetch_GBps: float = 0.0
    """Host→device bandwidth of a side lane's fetch (by kernel on a GPU), alone."""


# --- the wire ----------------------------------------------------------------------------------------------


def send(conn: Connection, msg: Any) -> None:
    """Plain pickle at the highest protocol: both ends are swapserve's own processes, and this skips the
    ForkingPickler machinery ``Connection.send`` goes through on every message."""
    conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())
