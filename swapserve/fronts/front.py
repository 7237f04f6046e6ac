"""One HTTP front process (``python -m swapserve.fronts.front``, started by the controller's
:class:`swapserve.fronts.service.FrontService`, its settings as JSON on stdin): the whole gateway (``make_app``)
over a :class:`RemoteNode`, accepting connections from the listening socket the controller hands it.

It dies with the controller (``PR_SET_PDEATHSIG``) and ignores SIGINT (Ctrl-C reaches the whole process group;
the controller stops the fronts in order). When told to drain — the controller is stopping, or this front got
SIGTERM — it stops accepting, lets its requests in flight finish, and exits.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
SHUTDOWN_S = 15.0
"""How long a draining front waits for its requests in flight (the controller's grace period is 10 s)."""


def main() -> int:
    config = json.load(sys.stdin)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != config["parent_pid"]:  # the controller died before the line above
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config["log_level"],
                        format=f"%(asctime)s %(levelname)s front{config['index']} %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import torch

    torch.set_num_threads(1)  # as in the controller: request tensors are copied, never computed on
    return asyncio.run(_serve(config))


async def _serve(config: dict[str, Any]) -> int:
    from aiohttp import web

    from swapserve.fronts.remote import RemoteNode
    from swapserve.gateway import GatewayConfig, make_app
    from swapserve.gateway.fast import listen
    from swapserve.metrics import watch_loop

    gateway = GatewayConfig(**{**config["gateway"], "uploads_dir": config["gateway"]["uploads_dir"]
                               and Path(config["gateway"]["uploads_dir"])})
    listener = socket.socket(fileno=config["listen_fd"])
    node = RemoteNode()
    await node.connect(config["socket_path"], config["index"], os.getpid())
    assert node.peer is not None
    runner = web.AppRunner(make_app(node, gateway, node.metrics), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    fast = await listen(runner, node, gateway, node.metrics, sock=listener)
    node.peer.notice("serving", config["index"])
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, node.drain.set)
    lag = asyncio.ensure_future(watch_loop(node.metrics.observe_loop_lag))
    await node.drain.wait()
    lag.cancel()
    await fast.close(SHUTDOWN_S)  # stops accepting, closes idle connections, waits for the requests in flight
    await runner.cleanup()  # likewise for the connections handed to the app
    node.metrics.flush()
    node.peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
