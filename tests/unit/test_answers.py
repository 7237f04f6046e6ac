"""The IO slab's answers part: first-fit blocks, given back (merged with their neighbours) once the last tensor
viewing them is gone — from any thread, as the answers' HTTP writers are threads."""

from __future__ import annotations

import gc
import mmap
import threading

import pytest
import torch

from swapserve.node.answers import Answers
from swapserve.node.messages import TensorRef
from swapserve.node.slab import ALIGN


def test_blocks_are_taken_first_fit_and_merge_when_given_back() -> None:
    a = Answers(mmap.mmap(-1, 64 * ALIGN), 16 * ALIGN, 64 * ALIGN)  # the last 48 alignment units
    first, second, third = a.take(10 * ALIGN), a.take(1), a.take(20 * ALIGN)
    assert (first, second, third) == (16 * ALIGN, 26 * ALIGN, 27 * ALIGN)  # each aligned
    assert a.take(18 * ALIGN) is None and a.held_bytes == 31 * ALIGN  # 17 units left
    a.give(first)
    assert a.take(18 * ALIGN) is None  # 10 + 17 free, not side by side
    a.give(second)
    assert a.take(11 * ALIGN) == first  # the first two merged, and taken before the tail (first fit)
    a.give(first)
    a.give(third)
    assert a.held_bytes == 0 and a.take(48 * ALIGN) == 16 * ALIGN  # all one free run again


def test_a_block_comes_back_once_every_view_of_it_is_gone() -> None:
    mapping = mmap.mmap(-1, 8 << 20)
    a = Answers(mapping, 0, 8 << 20)
    block = a.take(4 << 20)
    want = torch.arange(2 * 3 * 1000, dtype=torch.float32).view(2, 3, 1000)
    second = ALIGN * ((want.nbytes + ALIGN - 1) // ALIGN)
    torch.frombuffer(mapping, dtype=torch.float32, count=want.numel(), offset=block).copy_(want.view(-1))
    torch.frombuffer(mapping, dtype=torch.float16, count=7, offset=block + second).fill_(1.5)
    y, z = a.views(block, [TensorRef(block, "float32", (2, 3, 1000)), TensorRef(block + second, "float16", (7,))])
    assert torch.equal(y, want) and torch.equal(z, torch.full((7,), 1.5, dtype=torch.float16))
    rows = [y[0], y[1]]  # a request's rows, as the dispatcher hands them out
    del y, z
    gc.collect()
    assert a.held_bytes == 4 << 20  # the rows still view it
    gone = threading.Event()

    def writer(row: torch.Tensor) -> None:  # an answer's HTTP writer drops the last view on its thread
        memoryview(row.numpy()).tobytes()
        gone.set()

    t = threading.Thread(target=writer, args=(rows.pop(),))
    rows.clear()
    t.start()
    t.join()
    gc.collect()
    assert gone.is_set() and a.held_bytes == 0


def test_a_view_outside_its_block_is_refused() -> None:
    a = Answers(mmap.mmap(-1, 1 << 20), 0, 1 << 20)
    block = a.take(ALIGN)
    with pytest.raises(ValueError, match="not in the block"):
        a.views(block, [TensorRef(block, "float32", (ALIGN,))])  # 4 × ALIGN bytes in a block of ALIGN


def test_a_block_given_back_while_the_arena_is_busy_does_not_wait_for_it() -> None:
    """A collection can run a block's finalizer on a thread that holds the arena's lock (in ``take``, say):
    giving back must not take the lock."""
    a = Answers(mmap.mmap(-1, 1 << 20), 0, 1 << 20)
    block = a.take(ALIGN)

    def busy() -> None:
        with a._lock:
            a.give(block)

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive() and a.held_bytes == 0 and a.take(1 << 20) == 0
