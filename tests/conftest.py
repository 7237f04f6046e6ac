"""Shared fixtures: small real models turned into real artifacts, and engines on CPU or CUDA."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from swapserve.artifact import Artifact, build_artifact, load_artifact
from swapserve.config import EngineConfig, MiB, env
from swapserve.engine import HostStore, SwapEngine

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "/tests/gpu/" in path:
            item.add_marker(pytest.mark.gpu)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


class MLP(nn.Module):
    """~6 MB of fp32 weights in three layers, with a BatchNorm (buffers)."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(512, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class TiedLM(nn.Module):
    """A token model whose output head shares the embedding (tied weights) and makes a tensor
    inside forward (arange: a device that must follow the program to its device)."""

    def __init__(self, vocab: int = 4096, dim: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(64, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.emb(ids) + self.pos(pos)
        return self.head(torch.tanh(self.mix(h)))


def make_module(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    if kind == "mlp":
        m = MLP().eval()
        with torch.no_grad():  # non-trivial running statistics
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
        return m.to(dtype), (torch.randn(1, 512).to(dtype),)
    if kind == "tied":
        return TiedLM().eval().to(dtype), (torch.randint(0, 4096, (1, 16)),)
    raise ValueError(kind)


@pytest.fixture
def make_artifact(tmp_path: Path) -> Callable[..., tuple[Artifact, nn.Module, tuple[torch.Tensor, ...]]]:
    def make(kind: str = "mlp", seed: int = 0, name: str | None = None, max_batch: int = 4,
             dtype: torch.dtype = torch.float32) -> tuple[Artifact, nn.Module, tuple[torch.Tensor, ...]]:
        module, example = make_module(kind, seed, dtype)
        name = name or f"{kind}-{seed}"
        build_artifact(module, example, tmp_path / "artifacts" / name, name=name, max_batch=max_batch)
        return load_artifact(tmp_path / "artifacts" / name), module, example

    return make


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = env().shm_dir / f"swapserve-test-{uuid.uuid4().hex[:8]}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_engine(shm_dir: Path) -> Iterator[Callable[..., SwapEngine]]:
    made: list[tuple[SwapEngine, HostStore]] = []

    def make(device: str = "cpu", mode: str = "auto", pool_mib: int = 32, page_mib: int = 2,
             store_mib: int = 1024, store: HostStore | None = None, workspace_bytes: int = 256 * MiB,
             lanes: int = 2) -> SwapEngine:
        store = store or HostStore(shm_dir / uuid.uuid4().hex[:6], store_mib * MiB)
        cfg = EngineConfig(device=device, mode=mode, pool_bytes=pool_mib * MiB, page_bytes=page_mib * MiB,
                           workspace_bytes=workspace_bytes, min_chunk_bytes=256 * 1024, max_chunk_bytes=1 * MiB,
                           lanes=lanes)
        engine = SwapEngine(cfg, store)
        made.append((engine, store))
        return engine

    yield make
    for engine, store in made:
        engine.close()
        store.close()
