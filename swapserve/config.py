"""Typed configuration, and the one place where environment variables are read.

Environment variables are read lazily (on the first call of :func:`env`), never at import.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MiB = 1 << 20
GiB = 1 << 30


def parse_bytes(text: str | int) -> int:
    """``"16GiB"``, ``"512MiB"``, ``"1e9"``, ``4096`` → bytes."""
    if isinstance(text, int):
        return text
    s = text.strip()
    units = {"kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 1 << 10, "m": MiB, "g": GiB, "b": 1}
    low = s.lower()
    for suffix in sorted(units, key=len, reverse=True):
        if low.endswith(suffix):
            number = low[: -len(suffix)].strip()
            try:
                return int(float(number) * units[suffix])
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 512MiB, 16GiB or a number of bytes)") from None


MAX_BODY_BYTES = 64 * MiB
"""The largest request body a node takes by default (``serve --max-body``): 413 beyond it."""

MAX_LANES = 4
"""Most lanes a device may have: each holds a workspace, and in graph mode each side lane a graph of every
model it may run."""


@dataclass(frozen=True)
class EngineConfig:
    """How one device's swap engine is set up. Sizes are in bytes."""

    device: str = "cpu"
    """``"cpu"`` or ``"cuda:N"``."""
    pool_bytes: int = 1 * GiB
    """Device memory reserved at start for model weights (rounded down to whole pages)."""
    workspace_bytes: int = 512 * MiB
    """Device memory for activations, per lane, shared by every model that runs in that lane."""
    lanes: int = 2
    """Runs a device may have in flight at once (1 to :data:`MAX_LANES`), each on its own stream with its own
    workspace. Lane 0 swaps models in (and runs resident ones); the others (side lanes) run only resident
    models, beside it and each other — so a resident model's request need not wait behind another model's
    swap, nor behind another resident run."""
    page_bytes: int = 32 * MiB
    """Unit of the weight pool. Remapping a page costs ~60 µs on an H200 whatever its size, so pages
    are large; a model's last page is partly empty."""
    min_chunk_bytes: int = 1 * MiB
    """First copy chunk; chunks double up to ``max_chunk_bytes`` so compute starts early."""
    max_chunk_bytes: int = 8 * MiB
    """Largest copy chunk. Pinned copies reach 96% of link speed at 4 MiB and 98% at 8 MiB on an H200;
    cold swaps of resnet50, bert-base and efficientnet_b0 (fp16) were 1-4% faster with 8 than with 4."""
    mode: Literal["auto", "graph", "eager", "ondemand"] = "auto"
    """``graph`` replays one CUDA graph holding the chunked copies and the forward pass; ``eager``
    launches kernels from Python. ``auto`` is graph on CUDA, eager on CPU. ``ondemand`` is the baseline
    of frameworks without swapping: on a miss, every weight is copied from pageable (unpinned) host
    memory one tensor at a time, as ``model.to("cuda")`` does, and only then does the model run, eagerly."""
    align: int = 512
    """Alignment of each weight inside a model's buffer, in bytes."""

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda:N', not {self.device!r}")
        if self.page_bytes <= 0 or self.page_bytes % (64 * 1024):
            raise ValueError(f"page_bytes must be a positive multiple of 64 KiB, not {self.page_bytes}")
        if not 0 < self.min_chunk_bytes <= self.max_chunk_bytes:
            raise ValueError("need 0 < min_chunk_bytes <= max_chunk_bytes")
        if self.pool_bytes < self.page_bytes:
            raise ValueError(f"pool_bytes ({self.pool_bytes}) is smaller than one page ({self.page_bytes})")
        if self.align <= 0 or self.align & (self.align - 1):
            raise ValueError("align must be a power of two")
        if not 1 <= self.lanes <= MAX_LANES:
            raise ValueError(f"lanes must be 1 to {MAX_LANES}, not {self.lanes}")
        if self.mode == "graph" and self.device == "cpu":
            raise ValueError("graph mode needs a CUDA device")

    @property
    def resolved_mode(self) -> Literal["graph", "eager", "ondemand"]:
        if self.mode == "auto":
            return "eager" if self.device == "cpu" else "graph"
        return self.mode

    @property
    def num_pages(self) -> int:
        return self.pool_bytes // self.page_bytes


@dataclass(frozen=True)
class Env:
    """Settings taken from the environment (``SWAPSERVE_*``)."""

    home: Path
    shm_dir: Path
    token: str | None
    url: str


@functools.cache
def env() -> Env:
    """Read ``SWAPSERVE_*`` once, on first use."""
    home = Path(os.environ.get("SWAPSERVE_HOME", Path.home() / ".swapserve")).expanduser()
    shm_default = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return Env(
        home=home,
        shm_dir=Path(os.environ.get("SWAPSERVE_SHM_DIR", shm_default)),
        token=os.environ.get("SWAPSERVE_TOKEN") or None,
        url=os.environ.get("SWAPSERVE_URL", "http://127.0.0.1:8000"),
    )
