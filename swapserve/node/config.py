"""How a node is started: ``swapserve serve``'s flags as one typed, checked dataclass.

``swapserve serve`` only parses flags into a :class:`ServeConfig` and hands it to
``swapserve.node.serve.run``; tests and embedders build one directly. Defaults that come from the
environment (``SWAPSERVE_HOME``, ``SWAPSERVE_TOKEN``, ``SWAPSERVE_URL``, ``SWAPSERVE_SHM_DIR``) are read through
:func:`swapserve.config.env` when a config is created, never at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from swapserve.config import MAX_BODY_BYTES, MAX_LANES, GiB, MiB, env
from swapserve.hostcpu import usable_cores
from swapserve.scheduler.core import SWAP_PIECE_MS

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
"""The repository's example functions (present in a source checkout or an editable install)."""

MAX_FRONTS = 64

SPIN_MS = 1.0
"""The controller's polling (``spin_ms``) on a node of GPUs with cores to spare. On H200 machines it took the
request overhead's p50 from 1.08–1.14 to 0.75–0.82 ms in three order-balanced pairs on two leases (sessions 17
and 18), and cost the N = 400 trace nothing measurable (one pair on one node; ``bench/results/h200_20261129/``)."""
SPIN_CORES_BASE = 4
SPIN_CORES_PER_DEVICE = 3
"""Cores a node of GPUs needs to poll by default: the controller's (which it keeps busy while requests flow),
the system's and the clients' on the machine, about three for each worker (its lanes' threads, and its receiver,
which polls after each answer: ``Run.spin_s``), and one for each HTTP front process (``fronts``)."""

DEMO_FUNCTIONS = ("resnet50-classifier", "bert-base-encoder", "minilm-embedding")
"""Example function directories deployed by ``--demo``, in this order."""


@dataclass(frozen=True)
class ServeConfig:
    """A node's settings. Sizes are in bytes; ``None`` means the node sizes it at start (see each field)."""

    home: Path = field(default_factory=lambda: env().home)
    """The node's state: registry database and deployed bundles (``SWAPSERVE_HOME``, default ~/.swapserve)."""
    host: str = field(default_factory=lambda: listen_address(env().url)[0])
    """Interface the HTTP server listens on; ``0.0.0.0`` for every interface (then set a token). Default: the host
    of ``SWAPSERVE_URL`` (:func:`listen_address`), 127.0.0.1 where it is not set."""
    port: int = field(default_factory=lambda: listen_address(env().url)[1])
    """HTTP port. Default: the port of ``SWAPSERVE_URL``, 8000 where it is not set — so that ``serve`` and the CLI
    given one ``SWAPSERVE_URL`` meet."""
    fronts: int = 0
    """HTTP front processes. 0: the controller serves HTTP itself (one process does HTTP, scheduling and
    dispatch). K > 0: K processes share the port (``SO_REUSEPORT``) and each runs the gateway — parsing,
    decoding, encoding — passing the controller one frame per call (``swapserve.fronts``): for nodes whose one
    serving process is busy (several GPUs, hundreds of requests per second); a single request pays one more hop."""
    devices: tuple[str, ...] = ()
    """Devices to run workers on: ``cuda:N``; or ``cpu`` for one CPU worker, ``cpu:0,cpu:1,...`` for several
    (a CPU stand-in for a multi-GPU node: same processes and scheduling). Empty: every visible GPU, or
    ``cpu`` where there is none (:meth:`resolved_devices`)."""
    pool_bytes: int | None = None
    """Weight pool reserved per device at start. None: the node takes the device's free memory less the
    workspace and a safety margin (on ``cpu``, 1 GiB)."""
    workspace_bytes: int = 512 * MiB
    """Activation workspace per device and lane, shared by the models that run in that lane."""
    lanes: int = 2
    """Runs each device may have in flight (1 to 4): 2 runs a resident model beside another model's swap
    (each lane has its own stream and workspace), 3 or 4 more resident models beside those; 1 runs one thing
    at a time."""
    swap_piece_ms: float = SWAP_PIECE_MS
    """A long swap with time to spare before its deadline comes in pieces of about this many ms of copying,
    serving what is due first between them (the first lane is the only one that swaps); 0: in one go."""
    queue_ahead: bool = True
    """A device's first lane takes one more run (or piece of a swap) behind the one it runs, started by the
    worker as soon as that ends, instead of waiting for the reply, the next decision and its message to pass
    through the controller (``swapserve`` policy only)."""
    queue_ahead_within_ms: float | None = None
    """Queue ahead only when the run ahead is expected to end within this many ms (None: whenever); a running
    node changes it with ``PATCH /api/v1/scheduling``."""
    side_fetch: bool = True
    """A device's second lane may bring a model in itself (by kernel, sharing the host link with the first
    lane's copies instead of queueing behind them) and run it there, when that finishes first — a small
    model's request need not wait for a large model's swap (``swapserve`` policy, two lanes). On by default
    since order-balanced traces on an H200 showed it helps (see docs/design.md, "Side fetches")."""
    peer_copies: bool | None = None
    """A model another device holds whole may be copied from there (device to device: NVLink on GPUs) instead
    of from host memory, when the scheduler expects that to finish first (``swapserve`` policy, two or more
    devices). None (:meth:`resolved_peer_copies`): on for a node of two or more GPUs — what every two- and
    four-GPU trace since 2026-11-29 ran, on four H200s 0.904 against 0.849 without —, off for CPU workers, whose
    "peer" is the same memory as the host (see docs/design.md, "Peer copies")."""
    place_ahead: bool = True
    """A run queued behind another in a device's first lane has its pages placed (evictions, remaps) and its
    copies started (queued behind the copies of the run before) while the run before it executes, not when
    it starts (``swapserve`` policy; on by default since an order-balanced trace on an H200 showed it helps:
    see docs/design.md, "Placing ahead")."""
    gateway_margin: bool = True
    """A request's deadline is its SLO less its time outside the node's plan: its decoding in the gateway, and
    what its answer takes after the run as the gateway learned it for the function (the reply's way back, the
    outputs copied out, the answer encoded and written) — so that the scheduler puts a request whose answer is
    large (GPT-2's 13 MB of logits) before one that merely has an earlier deadline at the node (``swapserve``
    policy). On by default since the seventeenth session's two A/Bs on H200s, with answers sent from the slab,
    both found more requests in their SLO with it (see docs/design.md, "The gateway's margin")."""
    slo_values: bool = False
    """The eviction values weigh a swap's cost to a function's next request as a share of its SLO, not in ms: of
    two models that would slow their next request alike, the one with the tighter SLO stays (``swapserve``
    policy). Off by default: on one H200 at N = 400 (session 35) it moved misses from the image models of tight
    SLOs to BERT-large and GPT-2, attainment alike (see docs/design.md, "The host's CPU")."""
    host_store_bytes: int | None = None
    """Capacity of the pinned host store shared by all workers; beyond it models spill to their
    safetensors files and are reloaded on demand. None: the node takes half the free space of ``shm_dir``,
    within what the machine's available memory leaves its processes (:mod:`swapserve.hostmem`); a capacity given
    that exceeds either is refused at start."""
    shm_dir: Path = field(default_factory=lambda: env().shm_dir)
    """Where the host store's shared-memory buffers live (``SWAPSERVE_SHM_DIR``, default /dev/shm)."""
    token: str | None = field(default_factory=lambda: env().token)
    """Bearer token the management API requires (``SWAPSERVE_TOKEN``). None: no token (local use only)."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Largest request body (an infer request's, or any other but a deploy's): larger ones are answered 413
    before they are read."""
    max_upload_bytes: int = 8 * GiB
    """Largest deploy upload (the compressed bundle). Weights hardly compress: about the model's size."""
    max_bundle_bytes: int = 16 * GiB
    """Largest unpacked deploy bundle (``swapserve.functions.bundle.unpack``'s ``max_bytes``)."""
    policy: str = "swapserve"
    """Scheduling policy: ``swapserve``, or a baseline (``fifo_lru``, ``dedicated``) for benchmarks."""
    mode: str = "auto"
    """Engine mode: ``auto`` (CUDA graphs on GPUs), ``graph``, ``eager``, or the ``ondemand`` baseline."""
    prepare: bool = True
    """Swap each function in and capture its graphs on every device at deploy and start (off the request
    path); False defers that to each function's first request."""
    spin_ms: float | None = None
    """While runs are in flight and this long after each arrival and completion, the controller's event loop
    polls instead of sleeping (sparing the wake-ups of a worker's reply and of the next request; up to a core
    while requests flow). 0: off. None: :data:`SPIN_MS` on a node of GPUs whose machine has the cores to spare
    (:meth:`resolved_spin_ms`), else off."""
    sandbox_isolation: str = "best_effort"
    """Handler sandboxes: ``strict`` refuses to run handlers where the kernel lacks Landlock file isolation;
    ``best_effort`` uses what it offers and logs what is missing; ``off``: rlimits only (debugging)."""
    sandbox_idle_s: float = 300.0
    """A handler sandbox idle this long stops (down to the warm target set by recent load; to zero)."""
    demo: bool = False
    """Deploy the example functions (``DEMO_FUNCTIONS`` under ``examples_dir``) at start, building their
    artifacts in the node's process (trusted code; minutes on a CPU for resnet50 and bert-base)."""
    examples_dir: Path = EXAMPLES_DIR
    """Where ``demo`` finds the example function directories."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if not 0 <= self.fronts <= MAX_FRONTS:
            problems.append(f"fronts must be in 0..{MAX_FRONTS}, not {self.fronts}")
        if self.fronts and self.port == 0:
            problems.append("fronts need a given port (port 0 would give each front a port of its own)")
        for d in self.devices:
            if not re.fullmatch(r"cpu|cpu:\d+|cuda:\d+", d):
                problems.append(f"device {d!r} is not 'cpu', 'cpu:N' or 'cuda:N'")
        if len(set(self.devices)) != len(self.devices):
            problems.append(f"devices {list(self.devices)} name a device twice")
        if any(d.startswith("cpu") for d in self.devices) and any(d.startswith("cuda") for d in self.devices):
            problems.append("CPU workers cannot be mixed with GPUs")
        for name in ("pool_bytes", "workspace_bytes", "host_store_bytes", "max_body_bytes", "max_upload_bytes",
                     "max_bundle_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be positive, not {value}")
        if self.policy not in ("swapserve", "fifo_lru", "dedicated"):
            problems.append(f"policy {self.policy!r} is not swapserve, fifo_lru or dedicated")
        if self.mode not in ("auto", "graph", "eager", "ondemand"):
            problems.append(f"mode {self.mode!r} is not auto, graph, eager or ondemand")
        if self.sandbox_isolation not in ("strict", "best_effort", "off"):
            problems.append(f"sandbox_isolation {self.sandbox_isolation!r} is not strict, best_effort or off")
        if not self.sandbox_idle_s > 0:
            problems.append(f"sandbox_idle_s must be positive, not {self.sandbox_idle_s}")
        if not 1 <= self.lanes <= MAX_LANES:
            problems.append(f"lanes must be 1 to {MAX_LANES}, not {self.lanes}")
        if not 0 <= self.swap_piece_ms <= 1000:
            problems.append(f"swap_piece_ms must be in [0, 1000], not {self.swap_piece_ms}")
        if self.queue_ahead_within_ms is not None and not 0 <= self.queue_ahead_within_ms <= 1000:
            problems.append(f"queue_ahead_within_ms must be in [0, 1000], not {self.queue_ahead_within_ms}")
        if self.spin_ms is not None and not 0 <= self.spin_ms <= 1000:
            problems.append(f"spin_ms must be in [0, 1000], not {self.spin_ms}")
        if self.token is not None and not self.token.strip():
            problems.append("token must not be empty")
        if problems:
            raise ValueError("; ".join(problems))

    def resolved_devices(self) -> tuple[str, ...]:
        """``devices``, or every visible GPU, or ``("cpu",)`` where there is none."""
        if self.devices:
            return self.devices
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)

    def resolved_peer_copies(self, devices: tuple[str, ...]) -> bool:
        """``peer_copies``, or where unset whether ``devices`` are two or more GPUs."""
        if self.peer_copies is not None:
            return self.peer_copies
        return len(devices) > 1 and all(d.startswith("cuda") for d in devices)

    def resolved_spin_ms(self, devices: tuple[str, ...]) -> float:
        """``spin_ms``, or where unset :data:`SPIN_MS` for workers on GPUs when this process may use
        (:func:`swapserve.hostcpu.usable_cores`: its affinity, capped by a container's CPU quota) at least
        :data:`SPIN_CORES_BASE` + :data:`SPIN_CORES_PER_DEVICE` per device + one per HTTP front cores; else 0.
        A CPU worker computes on the cores a polling loop would take."""
        if self.spin_ms is not None:
            return self.spin_ms
        cores = usable_cores()
        gpus = all(d.startswith("cuda") for d in devices)
        need = SPIN_CORES_BASE + SPIN_CORES_PER_DEVICE * len(devices) + self.fronts
        return SPIN_MS if gpus and cores >= need else 0.0

    def demo_dirs(self) -> tuple[Path, ...]:
        """The example function directories ``demo`` deploys."""
        return tuple(self.examples_dir / name for name in DEMO_FUNCTIONS)


def listen_address(url: str) -> tuple[str, int]:
    """The host and port of a node's URL (``SWAPSERVE_URL``), where ``serve`` listens by default: the address the
    CLI reaches the node at. The node speaks plain HTTP; a URL it cannot listen at is a ValueError naming it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"SWAPSERVE_URL {url!r} is not a URL: {e}") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"SWAPSERVE_URL {url!r} is not an address the node can listen at (http://HOST:PORT); "
                         "give serve --host and --port")
    return parts.hostname, 80 if port is None else port


def parse_devices(text: str) -> tuple[str, ...]:
    """``"cpu"``, ``"cuda:0,cuda:1"``, ``"0,1"`` (shorthand for cuda:N) or ``"all"``/``""`` (auto) → devices."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if items in ([], ["all"], ["auto"]):
        return ()
    return tuple(f"cuda:{s}" if s.isdigit() else s for s in items)


__all__ = ["DEMO_FUNCTIONS", "EXAMPLES_DIR", "SPIN_MS", "ServeConfig", "listen_address", "parse_devices"]
