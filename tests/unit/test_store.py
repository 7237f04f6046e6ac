"""The host store, with real shared-memory files: layout, capacity, spill and reload, keys."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from swapserve.artifact import Artifact, build_artifact, load_artifact
from swapserve.artifact.manifest import WEIGHTS_FILE
from swapserve.engine.layout import Layout
from swapserve.engine.store import HostEntry, HostState, HostStore
from swapserve.errors import ArtifactError, CapacityError, NotFoundError, PoolBusyError

ALIGN = 512


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _small(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, width), nn.ReLU(), nn.Linear(width, 8)).eval()


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    """Three ~1 MiB models and one ~2 MiB model, built once for the module."""
    root = tmp_path_factory.mktemp("store-artifacts")
    out = {}
    for name, width, seed in [("one-a", 512, 1), ("one-b", 512, 2), ("one-c", 512, 3), ("two", 1024, 4)]:
        build_artifact(_small(width, seed), (torch.randn(1, 512),), root / name, name=name)
        out[name] = load_artifact(root / name)
    return out


def size(art: Artifact) -> int:
    return Layout.of(art.manifest, ALIGN).nbytes


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def slot_bytes(entry: HostEntry) -> dict[str, bytes]:
    assert entry.buffer is not None
    buf = entry.buffer.numpy()
    return {s.name: bytes(buf[s.offset:s.offset + s.nbytes]) for s in entry.layout.slots}


def expected_bytes(art: Artifact) -> dict[str, bytes]:
    tensors = safetensors.torch.load_file(str(art.weights_path))
    return {n: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n, t in tensors.items()}


@pytest.fixture
def store(shm_dir: Path):
    made: list[HostStore] = []

    def make(capacity: int, **kw) -> HostStore:
        s = HostStore(shm_dir / f"s{len(made)}", capacity, align=ALIGN, clock=kw.pop("clock", FakeClock()), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# --- add and layout --------------------------------------------------------------------------------


def test_add_lays_the_weights_out_in_first_use_order(make_artifact, store):
    art, _, _ = make_artifact("mlp")  # has buffers, an int64 scalar, and alignment gaps
    s = store(64 << 20)
    entry = s.add("mlp", art)
    assert entry.state is HostState.MEMORY and entry.loads == 1 and entry.pins == 0
    assert [sl.name for sl in entry.layout.slots] == [w.name for w in art.manifest.weights]
    assert entry.nbytes == size(art) and s.used_bytes == entry.nbytes
    want = expected_bytes(art)
    got = slot_bytes(entry)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == want[name], name
    # the buffer is the shared-memory file: another mapping of it sees the same bytes
    path = s.root / "mlp.bin"
    assert files(s.root) == ["mlp.bin"]
    on_file = np.fromfile(path, dtype=np.uint8)
    assert on_file.size == entry.nbytes
    assert np.array_equal(on_file, entry.buffer.numpy())


def test_add_without_loading_then_acquire(arts, store):
    s = store(8 << 20)
    entry = s.add("a", arts["one-a"], load=False)
    assert entry.state is HostState.DISK and entry.buffer is None and s.used_bytes == 0
    assert files(s.root) == []
    got = s.acquire("a")
    assert got is entry and entry.state is HostState.MEMORY and entry.pins == 1 and entry.loads == 1
    assert slot_bytes(entry) == expected_bytes(arts["one-a"])
    s.release("a")
    assert entry.pins == 0
    with pytest.raises(AssertionError):
        s.release("a")


def test_duplicate_and_unknown_keys(arts, store):
    s = store(8 << 20)
    s.add("a", arts["one-a"])
    with pytest.raises(ArtifactError, match="already in the host store"):
        s.add("a", arts["one-b"])
    assert slot_bytes(s.get("a")) == expected_bytes(arts["one-a"])  # the first one stays
    for call in (s.get, s.acquire, s.release, s.spill, s.remove):
        with pytest.raises(NotFoundError):
            call("nope")
    assert s.has("a") and not s.has("nope")


# --- capacity ----------------------------------------------------------------------------------


def test_model_larger_than_the_store_leaves_nothing(arts, store):
    s = store(size(arts["two"]) - 1)
    with pytest.raises(CapacityError, match="larger than the host store"):
        s.add("two", arts["two"])
    assert not s.has("two") and s.entries() == [] and files(s.root) == []
    s.add("a", arts["one-a"])  # still usable
    assert files(s.root) == ["a.bin"]


def test_full_store_spills_the_least_recently_used(arts, store):
    s = store(2 * size(arts["one-a"]) + 100)
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    s.acquire("b")
    s.release("b")
    s.acquire("a")  # a is now the most recently used
    s.release("a")
    s.add("c", arts["one-c"])
    assert s.get("b").state is HostState.DISK and s.get("b").buffer is None
    assert s.get("a").state is HostState.MEMORY and s.get("c").state is HostState.MEMORY
    assert s.spills == 1 and files(s.root) == ["a.bin", "c.bin"]
    assert s.used_bytes == size(arts["one-a"]) + size(arts["one-c"]) <= s.capacity
    # a reload of b makes room in turn: with c used after a, a goes now
    s.acquire("c")
    s.release("c")
    s.acquire("b")
    s.release("b")
    assert s.get("a").state is HostState.DISK and s.spills == 2
    assert files(s.root) == ["b.bin", "c.bin"]
    assert slot_bytes(s.get("b")) == expected_bytes(arts["one-b"])


def test_custom_value_picks_the_spill_victim(arts, store):
    keep_a = {"a": 10.0, "b": 0.0}
    s = store(2 * size(arts["one-a"]) + 100, value=lambda e: keep_a[e.key])
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    s.acquire("b")  # the most recent, but worth less
    s.release("b")
    keep_a["c"] = 5.0
    s.add("c", arts["one-c"])
    assert s.get("b").state is HostState.DISK and s.get("a").state is HostState.MEMORY


def test_pinned_entries_are_never_spilled(arts, store):
    s = store(2 * size(arts["one-a"]) + 100)
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    s.acquire("a")
    s.acquire("b")
    with pytest.raises(PoolBusyError, match="in use"):
        s.add("c", arts["one-c"])
    assert not s.has("c") and files(s.root) == ["a.bin", "b.bin"]
    assert s.get("a").state is HostState.MEMORY and s.get("b").state is HostState.MEMORY
    with pytest.raises(PoolBusyError):
        s.spill("a")
    with pytest.raises(PoolBusyError):
        s.remove("b")
    # one pinned, one not: the unpinned one goes, even if it is the most recent
    s.release("b")
    s.acquire("b")
    s.release("b")
    s.add("c", arts["one-c"])
    assert s.get("a").state is HostState.MEMORY and s.get("b").state is HostState.DISK
    assert slot_bytes(s.get("a")) == expected_bytes(arts["one-a"])


def test_a_refused_load_spills_nothing(arts, store):
    s = store(size(arts["one-a"]) + size(arts["two"]) - 1)
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    s.acquire("a")  # a pinned; b alone cannot make room for two
    with pytest.raises(PoolBusyError):
        s.add("two", arts["two"])
    assert not s.has("two")
    assert s.get("b").state is HostState.MEMORY  # the store is left as it was
    assert s.spills == 0


# --- spill and reload --------------------------------------------------------------------------


def test_reload_after_spill_gives_identical_bytes(arts, store):
    s = store(8 << 20)
    entry = s.add("a", arts["one-a"])
    before = slot_bytes(entry)
    raw = entry.buffer.numpy().tobytes()
    s.spill("a")
    assert entry.state is HostState.DISK and entry.buffer is None and s.used_bytes == 0
    assert files(s.root) == []
    s.spill("a")  # spilling twice is harmless
    s.acquire("a")
    assert entry.state is HostState.MEMORY and entry.loads == 2
    assert slot_bytes(entry) == before == expected_bytes(arts["one-a"])
    assert entry.buffer.numpy().tobytes() == raw  # padding included
    s.release("a")


def test_spill_listeners_run_before_the_buffer_is_unmapped(arts, store):
    s = store(2 * size(arts["one-a"]) + 100)
    seen: list[tuple[str, HostState, bool, bytes]] = []

    def listener(e: HostEntry) -> None:
        assert e.buffer is not None  # still mapped: a device backend unpins it here
        first = e.layout.slots[0]
        seen.append((e.key, e.state, (s.root / f"{e.key}.bin").exists(),
                     bytes(e.buffer.numpy()[first.offset:first.offset + first.nbytes])))

    s.subscribe(listener)
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    assert seen == []
    s.add("c", arts["one-c"])  # spills a
    s.spill("b")
    s.remove("c")
    s.remove("a")  # already on disk: no call
    want = {k: expected_bytes(arts[f"one-{k}"])[arts[f"one-{k}"].manifest.weights[0].name] for k in "abc"}
    assert [k for k, *_ in seen] == ["a", "b", "c"]
    for key, state, on_file, first in seen:
        assert state is HostState.MEMORY and on_file and first == want[key]


def test_remove_deletes_the_shared_memory_file(arts, store):
    s = store(8 << 20)
    s.add("a", arts["one-a"])
    s.add("b", arts["one-b"])
    assert files(s.root) == ["a.bin", "b.bin"]
    s.remove("a")
    assert files(s.root) == ["b.bin"] and not s.has("a") and s.used_bytes == size(arts["one-b"])
    with pytest.raises(NotFoundError):
        s.get("a")
    s.add("a", arts["one-a"])  # the key can be used again
    assert files(s.root) == ["a.bin", "b.bin"]
    s.close()
    assert files(s.root) == [] and s.entries() == []


def test_a_failed_load_leaves_nothing(arts, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(arts["one-a"].path, bad)
    art = load_artifact(bad)
    w = bad / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated after it was opened
    s = store(8 << 20)
    with pytest.raises(ArtifactError, match="truncated"):
        s.add("bad", art)
    assert not s.has("bad") and files(s.root) == []
    entry = s.add("bad", art, load=False)  # registered lazily, the load fails at first use
    with pytest.raises(ArtifactError):
        s.acquire("bad")
    assert entry.state is HostState.DISK and entry.pins == 0 and files(s.root) == []


def test_fills_run_side_by_side_and_one_in_progress_is_held(arts, store, monkeypatch):
    from swapserve.engine import store as store_mod

    s = store(2 * size(arts["one-a"]))  # room for two of the ~1 MiB models
    started, go = threading.Event(), threading.Event()
    real = store_mod._pwrite_all

    def held(fd, data, offset):  # the background add's fill waits until told; the main thread's does not
        if threading.current_thread() is not threading.main_thread():
            started.set()
            assert go.wait(10)
        real(fd, data, offset)

    monkeypatch.setattr(store_mod, "_pwrite_all", held)
    bg = threading.Thread(target=s.add, args=("a", arts["one-a"]))
    bg.start()
    try:
        assert started.wait(10)
        filling = s.get("a")
        assert filling.state is HostState.FILLING and s.used_bytes == filling.nbytes
        with pytest.raises(PoolBusyError, match="still being loaded"):
            s.acquire("a")
        with pytest.raises(PoolBusyError):
            s.remove("a")
        s.add("b", arts["one-b"])  # not behind the first fill
        s.add("c", arts["one-c"])  # the filling model counts and is no victim: b goes
        assert s.get("b").state is HostState.DISK and s.get("c").state is HostState.MEMORY
    finally:
        go.set()
        bg.join()
    entry = s.get("a")
    assert entry.state is HostState.MEMORY and entry.pins == 0 and entry.loads == 1
    assert slot_bytes(entry) == expected_bytes(arts["one-a"])


def test_a_fill_outliving_the_store_leaves_nothing(arts, store, monkeypatch):
    from swapserve.engine import store as store_mod

    s = store(8 << 20)
    started, go = threading.Event(), threading.Event()
    real = store_mod._pwrite_all

    def held(fd, data, offset):
        started.set()
        assert go.wait(10)
        real(fd, data, offset)

    monkeypatch.setattr(store_mod, "_pwrite_all", held)
    raised: list[BaseException] = []

    def add() -> None:
        try:
            s.add("a", arts["one-a"])
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    bg = threading.Thread(target=add)
    bg.start()
    assert started.wait(10)
    s.close()  # the node stopping while a function loads
    go.set()
    bg.join()
    assert len(raised) == 1 and isinstance(raised[0], NotFoundError), raised
    assert files(s.root) == [] and not s.has("a")


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "", "..", "/abs", "a b", "-x", "x" * 129, "a\\b",
                                 "ä"])
def test_invalid_keys_are_rejected(arts, store, key):
    s = store(8 << 20)
    with pytest.raises(ArtifactError, match="invalid model key"):
        s.add(key, arts["one-a"])
    assert s.entries() == [] and files(s.root) == []
    assert files(s.root.parent) == [s.root.name]  # nothing written next to the store either


@pytest.mark.parametrize("key", ["a", "resnet50", "bert-base.v2", "A_1", "x" * 128])
def test_valid_keys_are_accepted(arts, store, key):
    s = store(8 << 20)
    s.add(key, arts["one-a"])
    assert files(s.root) == [f"{key}.bin"]


def test_a_key_with_a_trailing_newline_is_rejected(arts, store):
    s = store(8 << 20)
    with pytest.raises(ArtifactError, match="invalid model key"):
        s.add("a\n", arts["one-a"])
