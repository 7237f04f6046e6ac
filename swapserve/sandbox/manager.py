"""The node's handler sandboxes: one launcher (zygote) shared by one pool per function with a handler,
and the deploy-time check of a handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from swapserve.config import env
from swapserve.sandbox.config import ModelSignature, SandboxConfig
from swapserve.sandbox.errors import HandlerLoadError
from swapserve.sandbox.launcher import Launcher, SpawnLauncher, ZygoteLauncher
from swapserve.sandbox.pool import SandboxPool
from swapserve.sandbox.types import CallModel, ColdStart, PoolStats, SandboxEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerInfo:
    """What :func:`validate_handler` found."""

    has_setup: bool
    is_async: bool
    """``handle`` is ``async def``."""
    cold_start: ColdStart
    """The throwaway sandbox's start (setup included if it ran)."""
    isolation: dict[str, Any]


def check_handler_path(directory: str | Path, handler: str) -> Path:
    """``handler`` must name a .py file inside ``directory`` (no escape through '..' or a symlink)."""
    root = Path(directory).resolve()
    rel = Path(handler)
    if rel.is_absolute() or ".." in rel.parts or rel.suffix != ".py":
        raise HandlerLoadError(f"handler: {handler!r} must be a relative path to a .py file inside the function "
                               "directory", http_status=400)
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise HandlerLoadError(f"handler: {handler!r} resolves outside the function directory", http_status=400)
    if not path.is_file():
        raise HandlerLoadError(f"handler: no file {handler!r} in the function directory", http_status=400)
    return path


async def validate_handler(directory: str | Path, handler: str = "handler.py", *,
                           models: Mapping[str, ModelSignature] | None = None, config: SandboxConfig | None = None,
                           launcher: Launcher | None = None, run_setup: bool = True) -> HandlerInfo:
    """Load ``handler`` in a throwaway sandbox: import it, check ``handle(request, models)`` and ``setup``,
    run ``setup()`` (unless told not to). Raises :class:`HandlerLoadError` with HTTP status 400 naming what
    is wrong (syntax error and line, failing import, missing ``handle``, failing ``setup``), or a
    :class:`SandboxStartError` (503) if no sandbox could start. Uses ``launcher`` (the node's zygote) if
    given, else a one-off interpreter."""
    check_handler_path(directory, handler)
    own = launcher is None
    launcher = launcher or SpawnLauncher((config or SandboxConfig()).limits)
    cfg = replace(config or SandboxConfig(), min_sandboxes=0, max_sandboxes=1)

    async def no_calls(*_: Any) -> Any:
        raise HandlerLoadError("model calls are not available while validating a handler")

    pool = SandboxPool(Path(directory).name, directory, handler, models or {}, no_calls, launcher, cfg,
                       run_setup=run_setup)
    try:
        await pool.warm_up(1)
    except HandlerLoadError as e:
        e.http_status = 400
        raise
    finally:
        await pool.close(grace_s=0.0)
        if own:
            await launcher.close()
    hello = pool.hello
    assert hello is not None
    return HandlerInfo(hello.has_setup, hello.is_async, pool.stats().cold_starts[-1], hello.isolation)


class SandboxManager:
    """Owns the zygote and the pools. ``call_model`` is given to every pool (see :class:`SandboxPool`).

    ``config.deny_paths`` should hold the node's home and its shared-memory directory; if empty, the
    environment's (``SWAPSERVE_HOME``, ``SWAPSERVE_SHM_DIR``) are used.
    """

    def __init__(self, call_model: CallModel, config: SandboxConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic, on_event: Callable[[SandboxEvent], None] | None = None):
        cfg = config or SandboxConfig()
        if not cfg.deny_paths:
            cfg = replace(cfg, deny_paths=(env().home, env().shm_dir))
        self.config = cfg
        self.call_model = call_model
        self.clock = clock
        self.on_event = on_event
        self.launcher: Launcher = (ZygoteLauncher(cfg.limits, cfg.start_timeout_s) if cfg.start_method == "zygote"
                                   else SpawnLauncher(cfg.limits))
        self._pools: dict[str, SandboxPool] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start the zygote now (a second or two: it imports torch) rather than on the first request."""
        if isinstance(self.launcher, ZygoteLauncher):
            await self.launcher.start()

    def add(self, function: str, directory: str | Path, handler: str, models: Mapping[str, ModelSignature], *,
            config: SandboxConfig | None = None) -> SandboxPool:
        """The pool for a function version (replacing the previous version's pool, which finishes its
        requests and then stops: call from the event loop). Starts nothing: sandboxes start on the first
        request or :meth:`prewarm`."""
        cfg = config or self.config
        if not cfg.deny_paths:
            cfg = replace(cfg, deny_paths=self.config.deny_paths)
        pool = SandboxPool(function, directory, handler, models, self.call_model, self.launcher, cfg,
                           clock=self.clock, on_event=self.on_event)
        old = self._pools.get(function)
        self._pools[function] = pool
        if old is not None:
            self._retire(old)
        return pool

    def get(self, function: str) -> SandboxPool | None:
        return self._pools.get(function)

    def prewarm(self, function: str, n: int = 1) -> None:
        pool = self._pools.get(function)
        if pool is not None:
            pool.prewarm(n)

    async def remove(self, function: str) -> None:
        pool = self._pools.pop(function, None)
        if pool is not None:
            await pool.close()

    def discard(self, function: str) -> None:
        """Remove the function's pool without waiting: its running requests finish (up to its timeout), then
        its sandboxes stop. Call from the event loop; :meth:`close` waits for it."""
        pool = self._pools.pop(function, None)
        if pool is not None:
            self._retire(pool)

    async def validate(self, directory: str | Path, handler: str,
                       models: Mapping[str, ModelSignature] | None = None) -> HandlerInfo:
        """:func:`validate_handler` on this node's zygote and configuration."""
        return await validate_handler(directory, handler, models=models, config=self.config, launcher=self.launcher)

    def stats(self) -> dict[str, PoolStats]:
        return {name: pool.stats() for name, pool in self._pools.items()}

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop every pool (running requests get ``grace_s`` to finish) and the zygote."""
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.close(grace_s) for p in pools), *self._closing, return_exceptions=True)
        await self.launcher.close()

    def _retire(self, pool: SandboxPool) -> None:
        task = asyncio.get_running_loop().create_task(pool.close(grace_s=pool.config.timeout_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
