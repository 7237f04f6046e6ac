"""The management API against the real node: the token guard, list/describe/deploy/delete, status, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .harness import Functions, Server, assert_serves, infer_json

pytestmark = pytest.mark.integration

GUARDED = [
    ("GET", "/api/v1/functions"),
    ("POST", "/api/v1/functions"),
    ("GET", "/api/v1/functions/mlp"),
    ("DELETE", "/api/v1/functions/mlp"),
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/scheduling"),
    ("PATCH", "/api/v1/scheduling"),
    ("POST", "/v2/repository/models/mlp/unload"),
    ("POST", "/v2/repository/models/mlp/load"),
]


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_token_required(server: Server, functions: Functions, method: str, path: str):
    r = server.request(method, path)
    assert "token" in r.error(401)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    server.request(method, path, headers={"Authorization": f"Basic {server.token}"}).error(401)
    assert "wrong" in server.request(method, path, token="not-the-token").error(403)
    assert server.request(method, path, token=server.token + "x").status == 403
    # Nothing was changed by the refused calls.
    assert server.request("GET", "/v2/models/mlp/ready").status == 200
    assert_serves(server, functions.mlp)


def test_client_with_a_wrong_token(server: Server):
    from swapserve.client import ClientError

    with pytest.raises(ClientError) as e:
        server.client(token="wrong").list_functions()
    assert e.value.status == 403


def test_list_describe_and_status(server: Server):
    client = server.client()
    listed = {f["name"]: f for f in client.list_functions()}
    assert {"mlp", "pair"} <= set(listed)
    mlp = listed["mlp"]
    assert (mlp["version"], mlp["state"], mlp["reason"]) == (1, "READY", "")
    assert mlp["nbytes"] == (16 * 32 + 32 + 32 * 4 + 4) * 4, "the model's fp32 weight bytes"
    assert mlp["spec"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert mlp["created_at"] > 0
    assert client.get_function("mlp") == mlp
    r = server.request("GET", "/api/v1/functions/nosuch", token=True)
    assert "nosuch" in r.error(404)

    status = client.status()
    assert status["ready"] is True
    assert status["functions"] >= 2
    (dev,) = status["devices"]
    assert dev["device"] == "cpu" and dev["pool_bytes"] == 128 << 20
    assert dev["gpu"] == "", "a CPU device is none of the machine's GPUs"
    assert 0 < status["host_store_bytes"] <= status["host_store_capacity"] == 256 << 20


def test_scheduling_settings_change_on_the_running_node(server: Server, functions: Functions):
    client = server.client()
    before = client.scheduling()
    assert before == {"policy": "swapserve", "queue_ahead": True, "side_fetch": True, "swap_piece_ms": 3.0,
                      "queue_ahead_within_ms": None, "peer_copies": False, "side_lanes": None,
                      "place_ahead": True, "gateway_margin": True, "spin_ms": 0.0, "slo_values": False}
    try:
        after = client.configure_scheduling(side_fetch=False, swap_piece_ms=5, queue_ahead_within_ms=2, spin_ms=1,
                                            slo_values=True)
        assert after == {**before, "side_fetch": False, "swap_piece_ms": 5.0, "queue_ahead_within_ms": 2.0,
                         "spin_ms": 1.0, "slo_values": True}
        assert after == client.scheduling()
        for bad, why in (({"swap_piece_ms": 1, "bogus": 1}, "unknown setting 'bogus'"),
                         ({"side_fetch": "yes"}, "side_fetch must be true or false"),
                         ({"swap_piece_ms": -1}, "swap_piece_ms must be a number"),
                         ({"spin_ms": 2000}, "spin_ms must be a number"),
                         ({"slo_values": 1}, "slo_values must be true or false"),
                         ({"queue_ahead": False}, "queue_ahead is fixed"),
                         ({"peer_copies": True}, "two or more devices"),  # one device: no peers
                         ({"side_lanes": 2}, "side_lanes must be null (all) or a whole number in [0, 1]")):
            r = server.request("PATCH", "/api/v1/scheduling", json.dumps(bad).encode(),
                               {"Content-Type": "application/json"}, token=True)
            assert why in r.error(400)
        assert client.scheduling() == after  # all or nothing: a refused change changed nothing
        r = server.request("PATCH", "/api/v1/scheduling", b"[1]", {"Content-Type": "application/json"}, token=True)
        assert "JSON object" in r.error(400)
        assert_serves(server, functions.mlp, 1)  # and it serves on (its loop polling after each run)
        # The gateway's margin: with it, the node plans to less than the SLO (60 s), by the request's decoding
        # and what the function's answers took after their runs; without, to the SLO.
        x = {"x": torch.randn(1, 16)}
        for margin in (True, False):
            client.configure_scheduling(gateway_margin=margin)
            for _ in range(2):
                r = infer_json(server, functions.mlp.name, x)
                assert r.status == 200, r.body
            budget = r.json()["parameters"]["budget_ms"]
            assert (30_000 <= budget < 60_000 - 1e-3) if margin else budget == pytest.approx(60_000, abs=1e-3)
    finally:
        client.configure_scheduling(side_fetch=before["side_fetch"], swap_piece_ms=before["swap_piece_ms"],
                                    queue_ahead_within_ms=None, gateway_margin=before["gateway_margin"],
                                    spin_ms=before["spin_ms"], slo_values=before["slo_values"])


def test_deploy_describe_delete_redeploy(server: Server, functions: Functions, tmp_path: Path):
    client = server.client()
    info = client.deploy(functions.pair.variant(tmp_path, name="scratch"))
    assert (info["name"], info["version"], info["state"]) == ("scratch", 1, "READY")
    assert client.get_function("scratch")["spec"]["max_batch"] == 4
    assert_serves(server, functions.pair, name="scratch")

    # Redeploying a name makes a new version that serves at once.
    info = client.deploy(functions.pair.variant(tmp_path, name="scratch", max_batch=2))
    assert (info["version"], info["spec"]["max_batch"]) == (2, 2)
    assert server.request("GET", "/v2/models/scratch").json()["versions"] == ["2"]
    assert_serves(server, functions.pair, seed=4, name="scratch")

    r = server.request("DELETE", "/api/v1/functions/scratch", token=True)
    assert (r.status, r.json()) == (200, {"deleted": "scratch"})
    assert "scratch" not in {f["name"] for f in client.list_functions()}
    server.request("GET", "/api/v1/functions/scratch", token=True).error(404)
    server.request("GET", "/v2/models/scratch").error(404)
    infer_json(server, "scratch", {"x": torch.randn(1, 8), "ids": torch.zeros(1, 3, dtype=torch.int64)}).error(404)
    server.request("DELETE", "/api/v1/functions/scratch", token=True).error(404)

    # A deleted name deployed again never reuses a version number.
    info = client.deploy(functions.pair.variant(tmp_path, name="scratch"))
    assert info["version"] == 3
    assert_serves(server, functions.pair, seed=5, name="scratch")
    # An unloaded function can be deleted too.
    assert server.post_json("/v2/repository/models/scratch/unload", {}, token=True).status == 200
    client.delete("scratch")
    server.request("GET", "/v2/models/scratch").error(404)
    assert_serves(server, functions.pair)


def test_cli_ls_and_status(server: Server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_")}
    env.update(SWAPSERVE_URL=server.url, SWAPSERVE_TOKEN=server.token)
    ls = subprocess.run([sys.executable, "-m", "swapserve.cli", "ls"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert ls.returncode == 0, ls.stderr
    rows = {line.split()[0]: line.split() for line in ls.stdout.splitlines()[1:]}
    assert rows["mlp"][1:3] == ["1", "READY"]
    assert rows["pair"][1:3] == ["1", "READY"]
    env["SWAPSERVE_TOKEN"] = "wrong"
    st = subprocess.run([sys.executable, "-m", "swapserve.cli", "status"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert st.returncode == 2 and "403" in st.stderr, (st.returncode, st.stderr)
