"""The HTTP gateway: Open Inference Protocol v2 (KServe / Triton), the management API, metrics and docs.

``make_app(node, config)`` builds the aiohttp application; ``oip`` is the protocol codec (pure functions).
"""

from swapserve.gateway.app import make_app
from swapserve.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "make_app"]
