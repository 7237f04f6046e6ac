"""The scheduler's profiles are per model structure (``Artifact.structure``): functions that deploy one model —
tenants' copies of a base model — share what any one's runs teach it (``Node._profile``). Through a real Node in
this process with a real CPU worker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from swapserve.node.controller import Node, NodeConfig

from .harness import Function, Functions, in_node

pytestmark = pytest.mark.integration


def _renamed(fn: Function, root: Path, name: str) -> Path:
    """``fn``'s bundle (its model, its weights) as function ``name``."""
    dest = root / f"{name}-{fn.name}"
    shutil.copytree(fn.bundle, dest)
    raw = yaml.safe_load((dest / "function.yaml").read_text())
    raw["name"] = name
    (dest / "function.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def test_functions_of_one_model_structure_share_its_profile(functions: Functions, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node) -> None:
        await node.deploy(functions.mlp.bundle)
        await node.deploy(_renamed(functions.mlp, tmp_path, "tenant"))
        await node.deploy(functions.pair.bundle)
        profiles = node.state.profiles
        assert profiles["mlp"] is profiles["tenant"] and profiles["pair"] is not profiles["mlp"]
        learned = dict(profiles["tenant"].exec_ms)
        for _ in range(4):  # resident after the first: each run alone teaches its time
            await node.infer("mlp", {"x": torch.randn(1, 16)})
        assert profiles["tenant"].exec_ms != learned, "mlp's runs taught the tenant of its model nothing"

        # Redeployed with another model, the tenant takes that model's profile; mlp keeps its own.
        await node.deploy(_renamed(functions.pair, tmp_path, "tenant"))
        assert profiles["tenant"] is profiles["pair"] and profiles["mlp"] is not profiles["pair"]
        await node.deploy(_renamed(functions.pair, tmp_path, "mlp"))  # mlp's model is no function's any more
        assert list(node._structures.values()) == [profiles["pair"]], "a structure no function has is forgotten"

    in_node(monkeypatch, NodeConfig(home=tmp_path / "home", devices=("cpu",), pool_bytes=128 << 20,
                                    workspace_bytes=128 << 20, host_store_bytes=256 << 20), body)
