"""The CPU backend: real paging and real asynchronous copies, with host memory as the "device".

Physical pages are slices of one memfd; a model's virtual range is a PROT_NONE reservation into
which pages are mapped with ``mmap(MAP_FIXED | MAP_SHARED)``, exactly as CUDA maps pool pages into a
reserved virtual range. A copy thread stands in for the copy engine; each chunk completion is a
``threading.Event``. Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from swapserve.engine.backend.base import Backend, Waiter, effective_chunks
from swapserve.engine.layout import Chunk
from swapserve.errors import BackendError

_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    res = _libc.mmap(addr, length, prot, flags, fd, offset)
    if res in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise BackendError(f"mmap failed: {os.strerror(err)}")
    return int(res)


@dataclass
class _Job:
    dst: torch.Tensor
    host: torch.Tensor
    chunks: list[tuple[int, Chunk]]
    events: list[threading.Event]
    error: list[BaseException] = field(default_factory=list)


class CpuWaiter(Waiter):
    def __init__(self, job: _Job, copied: Sequence[bool]):
        self._job = job
        self._eff = effective_chunks(copied)

    def wait(self, chunk: int) -> None:
        j = self._eff[chunk]
        if j >= 0:
            self._job.events[j].wait()
            if self._job.error:
                raise BackendError(f"host→device copy failed: {self._job.error[0]!r}")

    def finish(self) -> None:
        for e in self._job.events:
            e.wait()
        if self._job.error:
            raise BackendError(f"host→device copy failed: {self._job.error[0]!r}")


class CpuBackend(Backend):
    def __init__(self, page_bytes: int):
        self.device = torch.device("cpu")
        self.page_bytes = page_bytes
        self._fd = -1
        self._num_pages = 0
        self._mapped: set[int] = set()
        """Addresses a page is mapped at: mapping over one fails, as ``cuMemMap`` does (``mmap`` would not)."""
        self._peers: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}
        """Imported peers' pools: the mapping and a uint8 tensor over it."""
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._copy_loop, name="swapserve-copy", daemon=True)
        self._thread.start()

    def create_pages(self, count: int) -> None:
        self._fd = os.memfd_create("swapserve-pool", 0)
        os.ftruncate(self._fd, count * self.page_bytes)
        self._num_pages = count

    def reserve(self, nbytes: int) -> int:
        size = -(-nbytes // self.page_bytes) * self.page_bytes
        return _mmap(None, size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)

    def release(self, va: int, nbytes: int) -> None:
        size = -(-nbytes // self.page_bytes) * self.page_bytes
        if any(va <= at < va + size for at in self._mapped):
            raise BackendError(f"pages are still mapped in the range at {va:#x}")
        if _libc.munmap(va, size) != 0:
            raise BackendError(f"munmap failed: {os.strerror(ctypes.get_errno())}")

    def map(self, va: int, page: int) -> None:
        if not 0 <= page < self._num_pages:
            raise BackendError(f"no page {page} in the pool")
        if va in self._mapped:
            raise BackendError(f"a page is already mapped at {va:#x}")
        self._mapped.add(va)
        _mmap(va, self.page_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, self._fd,
              page * self.page_bytes)

    def unmap(self, va: int) -> None:
        # Keep the range reserved: replace the page with an inaccessible anonymous mapping.
        if va not in self._mapped:
            raise BackendError(f"no page is mapped at {va:#x}")
        _mmap(va, self.page_bytes, _PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
        self._mapped.discard(va)

    def view(self, va: int, nbytes: int) -> torch.Tensor:
        if not nbytes:  # a model's empty tensors (GPT-2 has some): torch.frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(va), dtype=torch.uint8)

    def pin(self, host: torch.Tensor) -> None:
        pass

    def unpin(self, host: torch.Tensor) -> None:
        pass

    def export_pages(self) -> list[int]:
        """One descriptor: the pool's memfd (page p at offset p × page_bytes)."""
        if self._fd < 0:
            raise BackendError("no pages to share yet")
        return [os.dup(self._fd)]

    def import_peer(self, peer: int, fds: Sequence[int]) -> None:
        if len(fds) != 1:
            raise BackendError(f"a CPU peer shares its pool as one descriptor, not {len(fds)}")
        if peer in self._peers:
            raise BackendError(f"peer {peer} is imported already")
        mm = mmap.mmap(fds[0], 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._peers[peer] = mm, torch.frombuffer(mm, dtype=torch.uint8)

    def has_peer(self, peer: int) -> bool:
        return peer in self._peers

    def drop_peer(self, peer: int) -> None:
        mm, _ = self._peers.pop(peer, (None, None))
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with the last of them
                pass

    def peer_view(self, peer: int, page: int, offset: int, nbytes: int) -> torch.Tensor:
        if peer not in self._peers:
            raise BackendError(f"peer {peer}'s pages are not imported here")
        start = page * self.page_bytes + offset
        return self._peers[peer][1][start:start + nbytes]

    def new_events(self, count: int) -> None:
        return None

    def start_copies(self, dst_va: int, host: torch.Tensor, chunks: Sequence[Chunk], copy: Sequence[bool],
                     events: object | None = None) -> Waiter:
        todo = [(i, c) for i, c in enumerate(chunks) if copy[i]]
        job = _Job(self.view(dst_va, chunks[-1].end), host, todo, [threading.Event() for _ in chunks])
        for i, c in enumerate(copy):
            if not c:
                job.events[i].set()
        self._jobs.put(job)
        return CpuWaiter(job, copy)

    def _copy_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                for i, c in job.chunks:
                    job.dst[c.start:c.end].copy_(job.host[c.start:c.end])
                    job.events[i].set()
            except BaseException as e:  # noqa: BLE001 - reported to the waiting compute
                job.error.append(e)
            finally:
                for e in job.events:
                    e.set()

    def new_stream(self) -> None:
        return None

    def compute(self, stream: object | None = None) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def synchronize(self, stream: object | None = None) -> None:
        pass

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        for peer in list(self._peers):
            self.drop_peer(peer)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
