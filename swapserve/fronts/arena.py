"""Shared memory between the controller and one front, one file each way, for large tensors: the sender writes
them into its arena and sends only where they lie; the receiver uses them in place and says when it is done with
them (:mod:`swapserve.fronts.peer`, ``Placed``). The controller's arena carries answers' outputs (the front
encodes its HTTP response from them), the front's carries requests' inputs (the controller's dispatcher copies
them into a worker's IO slab from there).

The sender creates the file under the node's shared-memory directory and allocates from it (first fit, 64-byte
aligned); the receiver maps it, and the file is unlinked as soon as both have (nothing is left behind if either
dies). A tensor that does not fit goes inline, as small ones do.
"""

from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import torch

from swapserve.artifact.manifest import dtype_name
from swapserve.config import env
from swapserve.fronts.peer import Placed, view_of

ALIGN = 64
ARENA_BYTES = 256 << 20
"""Per front and direction: the large tensors in flight to or from one front at once. tmpfs gives the file memory
only as it is written, and keeps what was written until the file is gone (when the front's connection closes)."""
PLACE_MIN_BYTES = 64 << 10
"""Tensors at least this large go through an arena; smaller ones inline (a copy is cheaper than the notices)."""


class Arena:
    """The sender's side: creates the file and allocates from it."""

    def __init__(self, nbytes: int = ARENA_BYTES, directory: Path | None = None):
        directory = directory or env().shm_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"swapserve-front-{uuid.uuid4().hex[:12]}.bin"
        self.nbytes = nbytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._free: list[tuple[int, int]] = [(0, nbytes)]
        """Free ranges [start, end), sorted, never adjacent."""
        self._used: dict[int, int] = {}
        """Allocated ranges: start → end."""

    @property
    def used_bytes(self) -> int:
        return sum(end - start for start, end in self._used.items())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of ``nbytes`` of free space (64-byte aligned), or None if no free range is that large."""
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (start, end) in enumerate(self._free):
            if end - start >= size:
                if end - start == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, end)
                self._used[start] = start + size
                return start
        return None

    def place(self, like: torch.Tensor) -> Placed | None:
        """Room shaped and typed as ``like``, to be sent by reference; None for a tensor under
        :data:`PLACE_MIN_BYTES` (it goes inline) or when no free range is large enough."""
        nbytes = like.numel() * like.element_size()
        if nbytes < PLACE_MIN_BYTES or (offset := self.alloc(nbytes)) is None:
            return None
        return Placed(view_of(self.map, dtype_name(like.dtype), list(like.shape), offset), offset)

    def free(self, offset: int) -> None:
        """Give back what :meth:`alloc` returned at ``offset`` (an unknown offset is an error: KeyError)."""
        start, end = offset, self._used.pop(offset)
        i = 0
        while i < len(self._free) and self._free[i][0] < start:
            i += 1
        if i < len(self._free) and self._free[i][0] == end:  # merge with the range after
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:  # and the one before
            start = self._free[i - 1][0]
            i -= 1
            del self._free[i]
        self._free.insert(i, (start, end))

    def unlink(self) -> None:
        """Remove the file (both mappings stay valid)."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.unlink()
        try:
            self.map.close()
        except BufferError:  # a view is still alive (an answer being written): the mapping goes with it
            pass


def open_arena(path: str, nbytes: int) -> mmap.mmap:
    """The receiver's side: map the sender's file."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


__all__ = ["ARENA_BYTES", "Arena", "PLACE_MIN_BYTES", "open_arena"]
