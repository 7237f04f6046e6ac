"""Where a worker writes a run's large answers, to be sent from there: blocks of its IO slab held until the last
tensor viewing them is gone.

A run's outputs in its lane's region of the slab must leave it before the lane's next run overwrites them, so
the controller copied large ones out (GPT-2's 12.9 MB of logits a request: 3.5 ms for a batch of four on an
H200 machine, ``bench/copy_out.py``), and the lane stayed busy meanwhile. A block of this part of the slab,
taken for the run at dispatch, outlives the run instead: the answers are views of it, their HTTP responses are
written from it, and the block is free again once the last of those views is gone (a finalizer on the
``memoryview`` every view's storage keeps alive, which runs on whichever thread drops it: the answers' writers
are threads). No copy, and the lane is free at the reply.
"""

from __future__ import annotations

import collections
import math
import mmap
import threading
import weakref
from collections.abc import Sequence

import torch

from swapserve.artifact.manifest import dtype_from_name
from swapserve.node.messages import TensorRef
from swapserve.node.slab import aligned


class Answers:
    """First-fit blocks of ``[start, end)`` of a slab's map."""

    def __init__(self, mapping: mmap.mmap, start: int, end: int):
        self._map = mapping
        self.start, self.end = start, end
        self._free: list[tuple[int, int]] = [(start, end - start)] if end > start else []
        """Free ``(offset, size)`` runs, by offset, never two adjacent."""
        self._held: dict[int, int] = {}
        """Size of each block taken, by offset."""
        self._returned: collections.deque[int] = collections.deque()
        """Blocks given back and not yet merged into ``_free``: a finalizer may run on any thread, even on one
        that holds ``_lock`` (a collection can run it anywhere), so it only appends here."""
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            self._reclaim()
            return sum(self._held.values())

    def take(self, nbytes: int) -> int | None:
        """The offset of a free block of at least ``nbytes``, now held; None if none is free."""
        size = aligned(max(nbytes, 1))
        with self._lock:
            self._reclaim()
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + size, free - size)
                    self._held[offset] = size
                    return offset
        return None

    def give(self, offset: int) -> None:
        """Give the block at ``offset`` back (from any thread, a finalizer's included)."""
        self._returned.append(offset)

    def _reclaim(self) -> None:
        """Merge the blocks given back into the free runs (under the lock)."""
        while self._returned:
            offset = self._returned.popleft()
            size = self._held.pop(offset)
            i = 0
            while i < len(self._free) and self._free[i][0] < offset:
                i += 1
            self._free.insert(i, (offset, size))
            if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
                self._free[i] = (offset, size + self._free.pop(i + 1)[1])
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                prev = self._free[i - 1]
                self._free[i - 1] = (prev[0], prev[1] + self._free.pop(i)[1])

    def views(self, offset: int, refs: Sequence[TensorRef]) -> list[torch.Tensor]:
        """The tensors ``refs`` name in the block at ``offset``: the block is given back once they and every view
        of them are gone."""
        with self._lock:
            size = self._held[offset]
        view = memoryview(self._map)[offset:offset + size]
        weakref.finalize(view, self.give, offset)
        block = torch.frombuffer(view, dtype=torch.uint8)  # its storage keeps ``view`` alive
        out = []
        for r in refs:
            dtype = dtype_from_name(r.dtype)
            start, n = r.offset - offset, dtype.itemsize * math.prod(r.shape)
            if not 0 <= start <= start + n <= size:
                raise ValueError(f"an output at {r.offset} of {n} bytes is not in the block at {offset} of {size}")
            out.append(block[start:start + n].view(dtype).view(r.shape))
        return out


__all__ = ["Answers"]
