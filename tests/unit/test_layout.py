"""Buffer layout and copy chunks: alignment, first-use order, page-bounded chunks, chunk lookup."""

from __future__ import annotations

import random

import pytest

from swapserve.artifact.manifest import Manifest, TensorSpec, WeightSpec
from swapserve.engine.backend.base import effective_chunks
from swapserve.engine.layout import Layout, last_chunk_of

KiB = 1 << 10
MiB = 1 << 20


def manifest_of(*weights: tuple[str, str, tuple[int, ...]]) -> Manifest:
    return Manifest(
        name="m",
        kind="exported",
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=(TensorSpec("y", "float32", (1, 4)),),
        weights=tuple(WeightSpec(n, d, s) for n, d, s in weights),
    )


def random_manifest(rng: random.Random, count: int, max_elems: int = 300_000) -> Manifest:
    dtypes = ["float32", "float16", "int64", "uint8", "bfloat16", "bool"]
    ws = []
    for i in range(count):
        shape = tuple(rng.randint(1, 64) for _ in range(rng.randint(0, 3)))
        if rng.random() < 0.3:  # some big ones, to cross pages
            shape = (rng.randint(1, max_elems),)
        ws.append((f"layer{i}.w", rng.choice(dtypes), shape))
    return manifest_of(*ws)


# --- Layout.of -------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 64, 512, 4096])
def test_offsets_are_aligned_ordered_and_do_not_overlap(align):
    m = random_manifest(random.Random(align), 40)
    layout = Layout.of(m, align)
    assert [s.name for s in layout.slots] == [w.name for w in m.weights]  # first-use order kept
    end = 0
    for s, w in zip(layout.slots, m.weights):
        assert s.offset % align == 0
        assert s.offset >= end  # after the previous weight ...
        assert s.offset - end < align  # ... with no more padding than the alignment needs
        assert (s.nbytes, s.dtype, s.shape) == (w.nbytes, w.dtype, w.shape)
        end = s.offset + s.nbytes
    assert layout.nbytes % align == 0 and end <= layout.nbytes < end + align
    assert layout.nbytes == -(-end // align) * align


def test_layout_of_a_small_manifest_by_hand():
    m = manifest_of(("a", "float32", (3,)), ("b", "int64", (2, 2)), ("c", "uint8", (1,)))
    layout = Layout.of(m, 16)
    assert [(s.name, s.offset, s.nbytes) for s in layout.slots] == [("a", 0, 12), ("b", 16, 32), ("c", 48, 1)]
    assert layout.nbytes == 64
    assert layout.pages(64) == 1 and layout.pages(63) == 2 and layout.pages(16) == 4
    # an empty model still has a buffer of one alignment unit
    assert Layout.of(manifest_of(), 512).nbytes == 512


def test_layout_follows_the_artifacts_first_use_order(make_artifact):
    art, _, _ = make_artifact("mlp")
    layout = Layout.of(art.manifest, 512)
    names = [s.name for s in layout.slots]
    assert names == [w.name for w in art.manifest.weights]
    offsets = [s.offset for s in layout.slots]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert names.index("fc1.weight") < names.index("fc2.weight") < names.index("fc3.weight")


# --- chunks ----------------------------------------------------------------------------------------

CHUNK_CASES = [
    # page, min, max
    (2 * MiB, 256 * KiB, 1 * MiB),
    (2 * MiB, 256 * KiB, 8 * MiB),  # max beyond a page: the page bounds each chunk
    (1 * MiB, 100 * KiB, 700 * KiB),  # sizes that do not divide the page
    (64 * KiB, 64 * KiB, 64 * KiB),
    (4 * MiB, 1 * KiB, 1 * MiB),
]


@pytest.mark.parametrize(("page", "lo", "hi"), CHUNK_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_chunks_cover_the_buffer_without_crossing_pages(page, lo, hi, seed):
    layout = Layout.of(random_manifest(random.Random(seed), 30), 512)
    chunks = layout.chunks(page, lo, hi)
    assert chunks[0].start == 0 and chunks[-1].end == layout.nbytes
    for a, b in zip(chunks, chunks[1:]):
        assert a.end == b.start  # contiguous, in order
    for c in chunks:
        assert c.nbytes > 0
        assert c.start // page == (c.end - 1) // page, c  # never crosses a page boundary
        assert c.nbytes <= hi


@pytest.mark.parametrize(("page", "lo", "hi"), CHUNK_CASES)
def test_chunk_sizes_ramp_from_min_to_max(page, lo, hi):
    layout = Layout.of(manifest_of(("w", "uint8", (10 * page + 12345,))), 512)
    chunks = layout.chunks(page, lo, hi)
    assert chunks[0].nbytes == min(lo, page)
    sizes = [c.nbytes for c in chunks]
    for k, c in enumerate(chunks):
        nominal = min(lo * 2**k, hi)
        cut = c.end % page == 0 or c.end == layout.nbytes  # stopped by a page boundary or the end
        assert c.nbytes <= nominal
        if not cut:
            assert c.nbytes == nominal, (k, c)
    # the ramp reaches its cap (max, or a whole page when pages are smaller) and the buffer is
    # mostly copied in chunks of that size
    cap = min(hi, page)
    assert max(sizes) == cap
    assert sum(n for n in sizes if n == cap) > layout.nbytes // 2


def test_chunks_by_hand():
    layout = Layout.of(manifest_of(("w", "uint8", (5000,))), 1)
    got = [(c.start, c.end) for c in layout.chunks(page_bytes=2048, min_chunk=256, max_chunk=1024)]
    assert got == [(0, 256), (256, 768), (768, 1792), (1792, 2048), (2048, 3072), (3072, 4096), (4096, 5000)]


# --- last_chunk_of ---------------------------------------------------------------------------------


def brute_last_chunk(slot, chunks) -> int:
    last = slot.offset + max(slot.nbytes, 1) - 1
    (idx,) = [i for i, c in enumerate(chunks) if c.start <= last < c.end]
    return idx


@pytest.mark.parametrize(("page", "lo", "hi"), CHUNK_CASES)
@pytest.mark.parametrize("seed", range(4))
def test_last_chunk_of_matches_brute_force(page, lo, hi, seed):
    layout = Layout.of(random_manifest(random.Random(100 + seed), 50), 256)
    chunks = layout.chunks(page, lo, hi)
    got = last_chunk_of(layout.slots, chunks)
    assert got == [brute_last_chunk(s, chunks) for s in layout.slots]
    assert got == sorted(got)  # first-use order: chunks needed never go back
    for s, ci in zip(layout.slots, got):
        # waiting for that chunk (and so all before it) covers every byte of the weight
        assert chunks[ci].end >= s.offset + s.nbytes
        assert ci == 0 or chunks[ci - 1].end < s.offset + s.nbytes


def test_last_chunk_of_by_hand():
    m = manifest_of(("a", "uint8", (100,)), ("b", "uint8", (300,)), ("c", "uint8", (10,)), ("d", "uint8", (1000,)))
    layout = Layout.of(m, 128)  # a@0, b@128..428, c@512..522, d@640..1640
    chunks = layout.chunks(page_bytes=1024, min_chunk=256, max_chunk=512)  # 0-256, 256-768, 768-1024, 1024-1536, ...
    assert [(c.start, c.end) for c in chunks] == [(0, 256), (256, 768), (768, 1024), (1024, 1536), (1536, 1664)]
    assert last_chunk_of(layout.slots, chunks) == [0, 1, 1, 4]


def test_zero_size_weight_inside_the_buffer():
    m = manifest_of(("a", "float32", (100,)), ("empty", "float32", (0,)), ("b", "float32", (100,)))
    layout = Layout.of(m, 64)
    chunks = layout.chunks(1024, 64, 1024)
    got = last_chunk_of(layout.slots, chunks)
    assert got == [brute_last_chunk(s, chunks) for s in layout.slots]


def test_zero_size_weight_at_the_end():
    m = manifest_of(("a", "float32", (128,)), ("empty", "float32", (0,)))
    layout = Layout.of(m, 512)
    chunks = layout.chunks(1024, 256, 1024)
    got = last_chunk_of(layout.slots, chunks)
    assert len(got) == 2 and all(0 <= c < len(chunks) for c in got)


# --- effective_chunks ------------------------------------------------------------------------------


def test_effective_chunks_by_hand():
    assert effective_chunks([]) == []
    assert effective_chunks([False, False]) == [-1, -1]
    assert effective_chunks([True, True, True]) == [0, 1, 2]
    assert effective_chunks([False, True, False, False, True, False]) == [-1, 1, 1, 1, 4, 4]


@pytest.mark.parametrize("seed", range(5))
def test_effective_chunks_brute_force(seed):
    rng = random.Random(seed)
    copied = [rng.random() < 0.4 for _ in range(200)]
    got = effective_chunks(copied)
    for i, e in enumerate(got):
        before = [j for j in range(i + 1) if copied[j]]
        assert e == (before[-1] if before else -1)
