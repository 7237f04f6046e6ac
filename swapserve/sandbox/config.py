"""How handler sandboxes are limited, sized and isolated, and the model signatures a handler may call.

Typed and immutable; nothing here reads the environment (the manager fills in the node's paths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swapserve.config import GiB, MiB
from swapserve.artifact.manifest import Manifest, TensorSpec, dtype_from_name
from swapserve.functions.spec import TensorDecl
from swapserve.tensors import datatype_of


@dataclass(frozen=True)
class SandboxLimits:
    """Per sandbox process. Rlimits are hard limits: handler code cannot raise them."""

    memory_bytes: int = 1 * GiB
    """Address space the handler may add on top of the sandbox's size when it starts (RLIMIT_AS). The
    runtime (Python, torch) is already mapped by then, so this is what the handler itself can allocate."""
    cpu_seconds: int = 600
    """CPU time over the sandbox's life (RLIMIT_CPU); a sandbox that uses it up is killed and replaced."""
    threads: int = 1
    """torch intra-op threads (and OMP/MKL threads) of the handler's own tensor work."""
    nice: int = 10
    """Scheduling priority below the controller's, so tenant pre/post-processing yields to dispatching."""
    open_files: int = 256
    file_bytes: int = 64 * MiB
    """Largest file the sandbox may write (RLIMIT_FSIZE), i.e. in its private /tmp."""
    tmp_bytes: int = 64 * MiB
    """Size of the private writable /tmp (a tmpfs; needs a mount namespace). 0: no writable directory."""
    tasks: int = 256
    """Threads plus processes (RLIMIT_NPROC). Linux does not enforce it for root; the PID namespace still
    takes every process of a sandbox down with it."""

    def __post_init__(self) -> None:
        if self.memory_bytes < 16 * MiB:
            raise ValueError("memory_bytes must be at least 16 MiB")
        for name in ("cpu_seconds", "threads", "open_files", "file_bytes", "tasks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not -20 <= self.nice <= 19:
            raise ValueError("nice must be in -20..19")


Isolation = Literal["strict", "best_effort", "off"]


@dataclass(frozen=True)
class SandboxConfig:
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    timeout_s: float = 30.0
    """A request's whole handler time, from arrival (waiting for a sandbox included): past it the request
    fails with 504 and the sandbox running it is killed and replaced."""
    start_timeout_s: float = 60.0
    """Starting one sandbox: process, isolation, importing handler.py, setup()."""
    max_sandboxes: int = 2
    """Per function: requests beyond this many in flight wait for a free sandbox."""
    min_sandboxes: int = 0
    """Kept warm even when idle (0: scale to zero)."""
    idle_s: float = 300.0
    """A sandbox idle this long is stopped, down to the warm target."""
    load_window_s: float = 60.0
    """The warm target is the peak number of requests in flight over this window (at most max_sandboxes)."""
    max_queue: int = 64
    """Requests waiting for a sandbox beyond which new ones get 429."""
    slab_bytes: int = 64 * MiB
    """Shared memory per sandbox for tensors, half each way (requests and model outputs in; model inputs
    and responses out). A request whose tensors do not fit gets 413."""
    max_message_bytes: int = 4 * MiB
    """Largest message a sandbox may send (its JSON response or parameters); tensors do not count."""
    isolation: Isolation = "best_effort"
    """``strict``: refuse to run handlers without Landlock file isolation; ``best_effort``: use what the
    kernel offers and log once what is missing; ``off``: rlimits only (debugging)."""
    start_method: Literal["zygote", "spawn"] = "zygote"
    """``zygote``: fork from a clean process that has already imported torch (tens of ms);
    ``spawn``: a fresh interpreter per sandbox (seconds: it imports torch)."""
    deny_paths: tuple[Path, ...] = ()
    """Paths handler code must never see (the node's home, its shared-memory directory): masked with empty
    mounts where a mount namespace is available, and never covered by a Landlock read rule."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables of every sandbox (the environment is otherwise clean)."""
    replace_on_error: bool = True
    """Replace a sandbox whose handler raised (its module state may be half-updated). Errors that are a
    model call's own (e.g. overload) and invalid return values never replace it."""
    handler_output: Literal["log", "discard"] = "log"
    """Handler stdout/stderr: forwarded line by line to the ``swapserve.sandbox.handler`` logger, or dropped."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_sandboxes <= 1024:
            raise ValueError("max_sandboxes must be in 1..1024")
        if not 0 <= self.min_sandboxes <= self.max_sandboxes:
            raise ValueError("min_sandboxes must be in 0..max_sandboxes")
        for name in ("timeout_s", "start_timeout_s", "idle_s", "load_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.slab_bytes < 1 * MiB or self.max_message_bytes < 64 * 1024:
            raise ValueError("slab_bytes must be at least 1 MiB and max_message_bytes at least 64 KiB")
        if self.isolation not in ("strict", "best_effort", "off"):
            raise ValueError(f"isolation must be strict, best_effort or off, not {self.isolation!r}")


@dataclass(frozen=True)
class ModelSignature:
    """What a handler may pass to one model handle and what it gets back."""

    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    max_batch: int = 1
    """Largest batch (first dimension where the declared shape has -1) of one call."""

    @classmethod
    def of(cls, manifest: Manifest, max_batch: int) -> ModelSignature:
        """A model as its artifact serves it, called with batches up to ``max_batch`` (the function's)."""

        def decls(specs: tuple[TensorSpec, ...]) -> tuple[TensorDecl, ...]:
            return tuple(TensorDecl(t.name, datatype_of(dtype_from_name(t.dtype)), tuple(t.shape)) for t in specs)

        return cls(decls(manifest.inputs), decls(manifest.outputs), max_batch)

    def to_wire(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "max_batch": self.max_batch}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ModelSignature:
        def decls(items: list[dict[str, Any]]) -> tuple[TensorDecl, ...]:
            return tuple(TensorDecl(t["name"], t["datatype"], tuple(t["shape"])) for t in items)

        return cls(decls(raw["inputs"]), decls(raw["outputs"]), int(raw["max_batch"]))


__all__ = ["Isolation", "ModelSignature", "SandboxConfig", "SandboxLimits"]
