"""``swapserve serve`` that cannot start: a clear message, a non-zero exit, nothing left behind, and the node that
was there first undisturbed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import Functions, Server, assert_serves, free_port, shm_root

pytestmark = pytest.mark.integration


def _serve(home: Path, port: int, shm: Path, extra: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "swapserve.cli", "serve", "--devices", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--home", str(home), "--token", "t0ken-for-a-failed-start",
           "--pool", "64MiB", "--host-store", "64MiB", "--workspace", "64MiB", *(extra or [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_")}
    env["SWAPSERVE_SHM_DIR"] = str(shm)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


@dataclass
class Refused:
    code: int
    stdout: str
    stderr: str
    shm: Path


@pytest.fixture(scope="module")
def refused(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Refused]]:
    """Two nodes started at once (each pays for its imports): one on the shared node's port, one on its home."""
    tmp = tmp_path_factory.mktemp("refused")
    shms = {k: shm_root() / f"swapserve-it-{uuid.uuid4().hex[:10]}" for k in ("port", "home")}
    for d in shms.values():
        d.mkdir()
    procs = {"port": _serve(tmp / "other-home", server.port, shms["port"]),
             "home": _serve(server.home, free_port(), shms["home"])}
    try:
        out = {k: p.communicate(timeout=120) for k, p in procs.items()}
        yield {k: Refused(procs[k].returncode, *out[k], shms[k]) for k in procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in shms.values():
            shutil.rmtree(d, ignore_errors=True)


def _leftovers(d: Path) -> list[str]:
    return sorted(str(x.relative_to(d)) for x in d.rglob("*"))


def test_home_in_use(server: Server, functions: Functions, refused: dict[str, Refused]):
    r = refused["home"]
    assert r.code == 2, r
    assert "in use by another swapserve node" in r.stderr, r.stderr
    assert not _leftovers(r.shm), _leftovers(r.shm)
    assert not (server.home / "token").exists(), "the refused node wrote into the running node's home"
    # The node that was there first is undisturbed.
    assert server.request("GET", "/v2/health/ready").status == 200
    assert {"mlp", "pair"} <= {f["name"] for f in server.client().list_functions()}
    assert_serves(server, functions.mlp)
    assert_serves(server, functions.pair)
    assert [p.name for p in server.shm_dir.iterdir()], "the running node's shared memory is still there"


def test_port_in_use(server: Server, functions: Functions, refused: dict[str, Refused]):
    r = refused["port"]
    assert r.code == 2, r
    assert f"cannot listen on 127.0.0.1:{server.port}" in r.stderr, r.stderr
    assert_serves(server, functions.mlp)


def test_port_in_use_leaves_no_shared_memory(refused: dict[str, Refused]):
    r = refused["port"]
    assert r.code == 2
    assert not _leftovers(r.shm), f"left in {r.shm}: {_leftovers(r.shm)}"


def test_a_host_store_larger_than_the_machine_can_hold_is_refused(tmp_path: Path):
    """A store the shared-memory directory cannot hold would fail its loads; one that leaves the node's processes
    too little memory gets a worker killed as it fills. Either is refused at start, saying what fits."""
    shm = tmp_path / "shm"
    shm.mkdir()
    p = _serve(tmp_path / "home", free_port(), shm, ["--host-store", "1000TiB"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, (out, err)
    assert f"does not fit {shm}" in err and "--host-store" in err, err
    assert not _leftovers(shm), _leftovers(shm)
