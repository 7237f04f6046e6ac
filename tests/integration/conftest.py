"""Fixtures of the integration tests: bundles built once, and real ``swapserve serve`` processes (see harness.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from swapserve.functions.build import build_bundle

from .harness import (HEAVY_PY, HEAVY_SPEC, MLP_PY, MLP_SPEC, PAIR_PY, PAIR_SPEC, WIDE_PY, WIDE_SPEC, Function,
                      Functions, Server, assert_stopped_cleanly, load_local_model, new_server, serve_mlp_and_pair,
                      write_function_dir)


@pytest.fixture(scope="session")
def functions(tmp_path_factory: pytest.TempPathFactory) -> Functions:
    """Build the bundles once (client side, in this process), as ``swapserve deploy`` would."""
    root = tmp_path_factory.mktemp("functions")
    made = {}
    for spec, code in ((MLP_SPEC, MLP_PY), (PAIR_SPEC, PAIR_PY), (HEAVY_SPEC, HEAVY_PY), (WIDE_SPEC, WIDE_PY)):
        src = write_function_dir(root / "src" / spec["name"], spec, code)
        bundle = root / "bundles" / spec["name"]
        build_bundle(src, bundle, progress=lambda line: None)
        made[spec["name"]] = Function(spec["name"], src, bundle, load_local_model(src))
    return Functions(root, made["mlp"], made["pair"], made["heavy"], made["wide"])


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Makes servers (each with its own home and shm dir); kills whatever is left of them at the end."""
    made: list[Server] = []

    def make(token: bool = True, devices: str = "cpu", extra: tuple[str, ...] = (), by_env: bool = False) -> Server:
        """``token`` False: start without ``--token`` (the node generates one and keeps it in its home).
        ``by_env``: the address and token given as ``SWAPSERVE_URL`` and ``SWAPSERVE_TOKEN``, not as flags."""
        s = new_server(tmp_path_factory.mktemp("node"))
        s.devices, s.extra, s.by_env = devices, extra, by_env
        if not token:
            s.token = None
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()
        shutil.rmtree(s.shm_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Server], request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared node, serving ``mlp`` (deployed with the ``swapserve deploy`` CLI) and ``pair`` (deployed
    with ``Client.deploy``). Its address and token are given as ``SWAPSERVE_URL`` and ``SWAPSERVE_TOKEN``, as the
    CLI takes them: every test of it checks that ``serve`` honours both."""
    s = server_factory(by_env=True).start()
    serve_mlp_and_pair(s, request.getfixturevalue("functions"), tmp_path_factory)  # built while the node starts
    yield s
    assert_stopped_cleanly(s, s.stop())
