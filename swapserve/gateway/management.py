"""The management API (deploy, list, describe, delete, status, scheduling settings) and the token that guards it.

Token rules: with ``config.token`` None every guarded route answers 403 (management disabled); otherwise a
missing or non-Bearer ``Authorization`` header is 401 and a wrong token 403. The token is checked before the
body is read, so an unauthenticated upload costs nothing. OIP repository load/unload use the same guard
(:func:`require_token`): they change what the node serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import math
import shutil
import tempfile
from pathlib import Path

from aiohttp import web

from swapserve.errors import AuthError, InvalidInputError
from swapserve.gateway.bundle import BundleLimits, extract_bundle, receive_upload
from swapserve.gateway.common import CONFIG, NODE, function_json, json_response, read_json_object
from swapserve.node.api import FunctionInfo, NodeAPI
from swapserve.node.runlog import RUNS_ANSWERED, RUNS_KEPT

log = logging.getLogger(__name__)

BUNDLE_TYPES = frozenset({"application/gzip", "application/x-gzip"})
DEPLOY_ROUTE = "deploy"
"""Route name of the deploy route: the middleware gives it ``deploy_timeout_s`` instead of the request timeout."""


class UnsupportedMediaTypeError(InvalidInputError):
    http_status = 415


def require_token(request: web.Request) -> None:
    token = request.app[CONFIG].token
    if token is None:
        raise AuthError("management API disabled: no token configured", 403)
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if not header:
        raise AuthError("missing management token: send 'Authorization: Bearer <token>'", 401)
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'", 401)
    # Constant-time comparison: the time to reject a guess must not tell how much of it was right.
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise AuthError("wrong management token", 403)


async def list_functions(request: web.Request) -> web.Response:
    require_token(request)
    return json_response({"functions": [function_json(i) for i in request.app[NODE].list_functions()]})


async def get_function(request: web.Request) -> web.Response:
    require_token(request)
    return json_response(function_json(request.app[NODE].get_function(request.match_info["name"])))


async def delete_function(request: web.Request) -> web.Response:
    require_token(request)
    name = request.match_info["name"]
    await request.app[NODE].delete(name)
    return json_response({"deleted": name})


async def status(request: web.Request) -> web.Response:
    require_token(request)
    return json_response(dataclasses.asdict(await request.app[NODE].status()))


async def get_scheduling(request: web.Request) -> web.Response:
    require_token(request)
    return json_response(await request.app[NODE].scheduling())


async def configure_scheduling(request: web.Request) -> web.Response:
    require_token(request)
    changes = await read_json_object(request)
    return json_response(await request.app[NODE].configure_scheduling(changes))


async def runs(request: web.Request) -> web.Response:
    """``?since=T``: only the runs that ended at T or later, T on the node's clock (the ``now`` of an earlier
    answer); ``&limit=K``: the last K of them (default :data:`RUNS_ANSWERED`, at most :data:`RUNS_KEPT`); and the
    controller's stalls that ended at T or later."""
    require_token(request)
    since, limit = request.query.get("since"), request.query.get("limit")
    try:
        t = None if since is None else float(since)
    except ValueError:
        raise InvalidInputError(f"since must be a number (the node's clock, s), not {since!r}") from None
    if t is not None and not math.isfinite(t):
        raise InvalidInputError(f"since must be finite, not {since!r}")
    try:
        k = RUNS_ANSWERED if limit is None else int(limit)
    except ValueError:
        raise InvalidInputError(f"limit must be a whole number, not {limit!r}") from None
    if not 1 <= k <= RUNS_KEPT:
        raise InvalidInputError(f"limit must be 1 to {RUNS_KEPT}, not {k}")
    return json_response(await request.app[NODE].runs(t, k))


async def deploy(request: web.Request) -> web.Response:
    """Stream the bundle to a private temporary directory, extract it safely, hand it to ``node.deploy``.

    The extraction and the deploy run as one shielded task: if the request times out they go on (a deploy
    cancelled halfway helps nobody, and an extraction thread cannot be cancelled anyway), and the temporary
    directory is removed when that task ends rather than under its feet."""
    require_token(request)
    if request.content_type not in BUNDLE_TYPES:
        raise UnsupportedMediaTypeError(f"Content-Type must be application/gzip (a gzip'd tar of the function "
                                        f"directory), not {request.content_type}")
    config = request.app[CONFIG]
    if config.uploads_dir is not None:
        config.uploads_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="swapserve-deploy-", dir=config.uploads_dir))
    task: asyncio.Task[FunctionInfo] | None = None
    try:
        archive = workdir / "bundle.tar.gz"
        await receive_upload(request, archive, config.upload_limit)
        limits = BundleLimits(config.bundle_limit, config.max_bundle_files)
        task = asyncio.ensure_future(_extract_and_deploy(request.app[NODE], archive, workdir / "bundle", limits))
        info = await asyncio.shield(task)
    finally:
        if task is not None and not task.done():
            task.add_done_callback(functools.partial(_cleanup_after, workdir))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return json_response(function_json(info), status=201)


async def _extract_and_deploy(node: NodeAPI, archive: Path, dest: Path, limits: BundleLimits) -> FunctionInfo:
    root = await asyncio.to_thread(extract_bundle, archive, dest, limits)
    archive.unlink()  # halve the disk this deploy holds while the node copies the bundle
    return await node.deploy(root)


def _cleanup_after(workdir: Path, task: asyncio.Task[FunctionInfo]) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if task.cancelled():
        return
    if (e := task.exception()) is not None:  # retrieved, so asyncio does not warn; nobody is waiting for it
        log.warning("deploy that outlived its request failed: %s", e)
    else:
        log.info("deploy that outlived its request finished: %s v%d", task.result().spec.name, task.result().version)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/functions", list_functions)
    app.router.add_post("/api/v1/functions", deploy, name=DEPLOY_ROUTE)
    app.router.add_get("/api/v1/functions/{name}", get_function)
    app.router.add_delete("/api/v1/functions/{name}", delete_function)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/api/v1/scheduling", get_scheduling)
    app.router.add_patch("/api/v1/scheduling", configure_scheduling)
    app.router.add_get("/api/v1/runs", runs)
