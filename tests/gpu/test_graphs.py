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
