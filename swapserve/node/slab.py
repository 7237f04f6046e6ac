"""A worker's IO slab: one shared-memory file through which request tensors go in and come out.

The controller creates it and writes a batch's inputs; the worker (which page-locks its mapping for
fast copies) reads them and writes outputs where the controller says: after them, or for large outputs in
a block of the slab's last part (:mod:`swapserve.node.answers`), sent to clients from there. Each lane of the
device has a region of its own in the rest (:meth:`Slab.region`) and runs one dispatch at a time, so the
regions need no allocator: inputs from the region's start, outputs never past its end.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from swapserve.artifact.manifest import dtype_from_name
from swapserve.errors import PayloadTooLargeError
from swapserve.node.messages import TensorRef

ALIGN = 256


def aligned(n: int) -> int:
    """``n`` rounded up to the slab's alignment (where each tensor in it starts)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Slab:
    def __init__(self, path: Path, nbytes: int, create: bool, answers_bytes: int = 0):
        """``answers_bytes``: the slab's last part, for large answers (the controller's; a worker writes where
        it is told)."""
        from swapserve.node.answers import Answers

        self.path = path
        self.nbytes = nbytes
        self.regions_bytes = nbytes - answers_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.answers = Answers(self._map, self.regions_bytes, nbytes)

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        n = 1
        for d in ref.shape:
            n *= d
        return torch.frombuffer(self._map, dtype=dtype_from_name(ref.dtype), count=n, offset=ref.offset).view(ref.shape)

    def rows(self, ref: TensorRef, start: int, count: int) -> torch.Tensor:
        """Rows ``[start, start + count)`` of the tensor at ``ref`` (all of a 0-dim one), in memory of their own:
        one copy of their bytes (~3 µs for a small output on the CI box, against ~6 µs through a view of the slab,
        a slice, ``empty_like`` and ``copy_``)."""
        dtype = dtype_from_name(ref.dtype)
        shape = (count, *ref.shape[1:]) if ref.shape else ()
        row = _nbytes(dtype, ref.shape[1:]) if ref.shape else dtype.itemsize
        begin = ref.offset + start * row
        size = row * count if ref.shape else row
        if not size:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(self._view[begin:begin + size]), dtype=dtype).view(shape)

    def region(self, lane: int, lanes: int) -> tuple[int, int]:
        """``[start, end)`` of a lane's part of the slab (equal parts of all but the answers', aligned)."""
        size = self.regions_bytes // lanes // ALIGN * ALIGN
        return lane * size, (lane + 1) * size

    def write_batch(self, parts: Sequence[Sequence[torch.Tensor]], offset: int = 0,
                    limit: int | None = None) -> tuple[tuple[TensorRef, ...], int]:
        """Write each input of a batch — the rows of every request, concatenated on dim 0 — from ``offset``,
        ending before ``limit`` (default: the slab's end). ``parts[i]`` holds input i of each request.
        Returns the refs and the end offset."""
        limit = self.nbytes if limit is None else limit
        start = offset
        refs = []
        for pieces in parts:
            first = pieces[0]
            shape = (sum(p.shape[0] for p in pieces), *first.shape[1:]) if first.dim() else ()
            ref = TensorRef(offset, str(first.dtype).removeprefix("torch."), tuple(shape))
            end = offset + _nbytes(first.dtype, shape)
            if end > limit:
                raise PayloadTooLargeError(f"a batch's inputs need more than the {limit - start} bytes of the IO "
                                           "slab's region; raise the slab size or lower max_batch")
            if (first.dim() or len(pieces) == 1) and all(
                    p.device.type == "cpu" and p.dtype == first.dtype and p.shape[1:] == first.shape[1:]
                    for p in pieces):
                at = offset  # rows of row-major tensors, one after another: their bytes, one after another
                for p in pieces:
                    raw = _raw(p)
                    self._view[at:at + len(raw)] = raw
                    at += len(raw)
            else:  # on a device, or pieces unlike the first (copy_ casts or refuses, as the batch's checks would)
                dst = self.tensor(ref)
                row = 0
                for p in pieces:
                    if dst.dim():
                        dst[row:row + p.shape[0]].copy_(p)
                        row += p.shape[0]
                    else:
                        dst.copy_(p)
            refs.append(ref)
            offset = aligned(end)
        return tuple(refs), offset

    def write(self, tensors: Sequence[torch.Tensor], offset: int, limit: int | None = None,
              non_blocking: bool = False) -> tuple[TensorRef, ...]:
        """Write whole tensors (a worker's outputs) from ``offset``, ending before ``limit`` (default: the
        slab's end); ``non_blocking``: device tensors' copies are only enqueued on the current stream (the
        caller waits for it before the slab is read). Checks that they fit before copying any."""
        limit = self.nbytes if limit is None else limit
        start = offset
        refs = []
        for t in tensors:
            ref = TensorRef(offset, str(t.dtype).removeprefix("torch."), tuple(t.shape))
            end = offset + t.numel() * t.element_size()
            if end > limit:
                raise PayloadTooLargeError(f"outputs need {end - start} bytes, more than the IO slab's region has "
                                           f"left ({limit - start}); raise the slab size or lower max_batch")
            refs.append(ref)
            offset = aligned(end)
        for ref, t in zip(refs, tensors):
            self.tensor(ref).copy_(t, non_blocking=non_blocking)
        return tuple(refs)

    def close(self) -> None:
        self.buffer = None  # type: ignore[assignment]
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass


def _raw(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes in row-major order (a copy only where it is not contiguous): copied into the slab
    as bytes, a small request's input costs ~1 µs on the CI box against ~8 µs through a tensor view of the slab
    (``torch.frombuffer``, a slice and ``copy_``), a cost every request pays on the event loop."""
    t = t.contiguous()
    if t.dtype in _NUMPY_DTYPES:
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # bfloat16 and others numpy lacks


_NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.float64, torch.int8, torch.uint8, torch.int16,
                           torch.int32, torch.int64, torch.bool})


def ref_nbytes(ref: TensorRef) -> int:
    """The bytes of the tensor at ``ref``."""
    return _nbytes(dtype_from_name(ref.dtype), ref.shape)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
