"""The swap engine: host store, device page pool, pipelined swap-in execution."""

from swapserve.engine.engine import EngineStats, PeerSource, SwapEngine
from swapserve.engine.pages import Residency
from swapserve.engine.store import HostState, HostStore

__all__ = ["EngineStats", "HostState", "HostStore", "PeerSource", "Residency", "SwapEngine"]
