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
        cases = [(torch.float16, (3, 224, 5)), (torch.int64, (1, 128)), (torch.bool, (7,)), (torch.uint8, (1001,)),
                 (torch.float32, ())]
        offset = 256
        for dtype, shape in cases:
            n = torch.empty(shape, dtype=dtype).numel() * dtype.itemsize
            x = slab[offset:offset + n].view(dtype).view(shape)
            x.view(torch.uint8).random_(0, 2 if dtype is torch.bool else 256)
            y = be.upload(x)
            assert y.device.type == "cuda" and y.dtype == dtype and y.shape == x.shape
            assert torch.equal(y.cpu().view(torch.uint8), x.view(torch.uint8)), dtype
            offset += (n + 255) // 256 * 256
        plain = torch.randn(4, 4)  # not registered: an ordinary copy
        assert torch.equal(be.upload(plain).cpu(), plain)
    finally:
        be.unpin(slab)


def test_runs_from_a_registered_slab_match_ordinary_inputs(make_artifact, make_engine):
    art, _, x = make_artifact("mlp")
    eng = make_engine("cuda:0", "graph")
    eng.add("m", art)
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
