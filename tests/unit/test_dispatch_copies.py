"""The dispatcher: how it spreads a run's large output copies over its copy threads, and what of the eviction
values it sends a worker."""

from __future__ import annotations

import torch

from swapserve.node.dispatch import copy_all, _pieces


def test_pieces_balance_bytes_and_copy_every_byte_once() -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 3_000_000, generator=g).half()  # a batch of four 6 MB rows (the slab's view)
    rows = torch.empty_like(batch)
    small, empty = torch.randn(3, generator=g), torch.empty(0, 5)
    strided = torch.randn(4, 3, generator=g)
    copies = [(rows[i], batch[i]) for i in range(4)]
    copies += [(torch.empty(3), small), (torch.empty(0, 5), empty), (torch.empty(3, 4).t(), strided)]
    parts = _pieces(copies, 4, min_bytes=1 << 20)
    assert len(parts) == 4
    loads = [sum(d.numel() * d.element_size() for d, _ in p) for p in parts]
    assert max(loads) - min(loads) <= (1 << 20) + 64, loads  # about equal: pieces of ~6 MB spread evenly
    for p in parts:
        copy_all(p)
    assert torch.equal(rows, batch)
    assert all(torch.equal(d, s) for d, s in copies[4:])  # small, empty and non-contiguous ones whole


def test_one_large_output_is_cut_for_several_threads_and_a_small_one_is_not() -> None:
    big = torch.arange(8_000_000, dtype=torch.float32)
    dest = torch.empty_like(big)
    parts = _pieces([(dest, big)], 4, min_bytes=4 << 20)
    assert len(parts) == 4  # 32 MB in four 8 MB pieces
    for p in parts:
        copy_all(p)
    assert torch.equal(dest, big)
    assert len(_pieces([(torch.empty(10), torch.arange(10.0))], 4)) == 1


def test_value_changes_bring_a_receiver_to_the_table_and_send_only_what_differs() -> None:
    import math
    import random

    from swapserve.node.dispatch import value_changes

    rng = random.Random(0)
    sent: dict[str, float] = {}
    worker: dict[str, float] = {}  # what the worker keeps: updated with each message's changes
    names = [f"f{i}" for i in range(40)]
    table: dict[str, float] = {}
    for step in range(300):
        if step % 50 == 0:  # a whole computation: every value moves
            table = {n: rng.random() for n in rng.sample(names, 25)}
        else:  # a few touched, one gone, one new, one turned hot
            for n in rng.sample(sorted(table), 3):
                table[n] = rng.random()
            table.pop(rng.choice(sorted(table)))
            table[rng.choice(names)] = rng.random()
            table[rng.choice(sorted(table))] = math.inf
        changes = value_changes(sent, table)
        worker.update(changes)
        assert sent == table
        assert all(worker.get(n, 0.0) == table.get(n, 0.0) for n in names)
        if step % 50:
            assert len(changes) <= 6  # only what moved, not the table
    assert value_changes(sent, dict(table)) == {}  # nothing moved: nothing to send
