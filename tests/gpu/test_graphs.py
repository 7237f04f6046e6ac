"""CUDA-graph specifics, run on the lent GPU (skipped where there is none)."""

from __future__ import annotations

import torch

from swapserve.artifact import zoo


def test_swap_graph_finds_every_copy_node(make_artifact, make_engine):
    art, _, x = make_artifact("mlp")
    eng = make_engine("cuda:0", "graph")
    eng.add("m", art)
    eng.infer("m", x)
    graphs = eng._models["m"].graphs[1]
    assert graphs.exact_partial  # partial swaps copy only missing chunks


def test_zoo_models_swap_bit_identically_in_both_modes(tmp_path, make_engine):
    from swapserve.artifact import build_artifact, load_artifact

    graph, eager = make_engine("cuda:0", "graph", pool_mib=256), make_engine("cuda:0", "eager", pool_mib=256)
    for name in ("resnet18", "bert-tiny"):
        z = zoo.get(name)
        for dtype in (torch.float32, torch.float16):
            key = f"{name}-{str(dtype)[6:]}"
            x = z.example(1, dtype)
            build_artifact(z.build(dtype), x, tmp_path / key, name=key, max_batch=2)
            art = load_artifact(tmp_path / key)
            for eng in (graph, eager):
                eng.add(key, art)
                cold = eng.infer(key, x)
                warm = eng.infer(key, x)
                assert all(torch.equal(a, b) for a, b in zip(cold, warm)), (key, eng.mode)


def test_upload_from_registered_memory_is_bit_exact(make_engine):
    eng = make_engine("cuda:0", "graph")
    be = eng.backend
    slab = torch.zeros(1 << 20, dtype=torch.uint8)
    be.pin(slab)
    try:
        # Past the inline size (kernel) and under it (tensor.to); words of 8, 4, 2 and 1 bytes; a scalar.
        cases = [(torch.float16, (3, 224, 5)), (torch.int64, (1, 4096)), (torch.float32, (1, 1027)),
                 (torch.int16, (4099,)), (torch.bool, (8193,)), (torch.uint8, (1001,)), (torch.float32, ())]
        offset = 256
        for dtype, shape in cases:
            n = torch.empty(shape, dtype=dtype).numel() * dtype.itemsize
            raw = slab[offset:offset + n]
            raw.random_(0, 2 if dtype is torch.bool else 256)
            x = raw.view(dtype).view(shape)
            y = be.upload(x)
            assert y.device.type == "cuda" and y.dtype == dtype and y.shape == x.shape
            assert torch.equal(y.cpu().reshape(-1).view(torch.uint8), raw), (dtype, shape)
            offset += (n + 255) // 256 * 256
        plain = torch.randn(4, 4)  # not registered: an ordinary copy
        assert torch.equal(be.upload(plain).cpu(), plain)
    finally:
        be.unpin(slab)
    for _ in range(2):  # buffers registered after it (perhaps at the same address): no stale device view
        again = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
        be.pin(again)
        try:
            x = again[512:512 + 3 * 224 * 224 * 2].view(torch.float16)
            assert torch.equal(be.upload(x).cpu().view(torch.uint8), again[512:512 + x.numel() * 2])
        finally:
            be.unpin(again)


def test_runs_from_a_registered_slab_match_ordinary_inputs(tmp_path, make_engine):
    from swapserve.artifact import build_artifact, load_artifact

    z = zoo.get("resnet18")
    x = z.example(1, torch.float16)  # a 294 KiB image: uploaded by the kernel from the slab
    build_artifact(z.build(torch.float16), x, tmp_path / "r18", name="r18", max_batch=1)
    eng = make_engine("cuda:0", "graph", pool_mib=256)
    eng.add("m", load_artifact(tmp_path / "r18"))
    want = eng.infer("m", x)
    slab = torch.zeros(1 << 20, dtype=torch.uint8)
    eng.backend.pin(slab)
    try:
        views = []
        offset = 512
        for t in x:
            n = t.numel() * t.element_size()
            v = slab[offset:offset + n].view(t.dtype).view(t.shape)
            v.copy_(t)
            views.append(v)
            offset += n
        for lane in (0, 1):
            got = eng.infer("m", views, lane=lane)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), lane
    finally:
        eng.backend.unpin(slab)
