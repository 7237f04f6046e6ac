"""What the swap engine needs from a device: physical pages, fixed virtual ranges that pages are
mapped into, pinned host memory, and chunked asynchronous host→device copies that compute can wait
on chunk by chunk.

Two implementations share every code path above them: CUDA (virtual memory management through the
driver API, a copy stream, one event per chunk) and CPU (a memfd standing in for device memory,
mapped with mmap, a copy thread, one threading.Event per chunk), so CI exercises the logic without a
GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from swapserve.engine.layout import Chunk
from swapserve.errors import BackendError


class Waiter(ABC):
    """Handed to a running program: it calls :meth:`wait` before the first use of a chunk's bytes."""

    @abstractmethod
    def wait(self, chunk: int) -> None:
        """Make the computation that follows wait until ``chunk`` (and every chunk before it) landed."""

    @abstractmethod
    def finish(self) -> None:
        """Block the host until every copy of this swap completed; raise if one failed."""


def effective_chunks(copied: Sequence[bool]) -> list[int]:
    """For each chunk, the last copied chunk at or before it (-1: none): waiting for that one is
    enough, since chunks complete in order and skipped chunks were already valid."""
    out, last = [], -1
    for i, c in enumerate(copied):
        if c:
            last = i
        out.append(last)
    return out


def copy_runs(chunks: Sequence[Chunk], copy: Sequence[bool]) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of consecutive chunks with ``copy[i]``, merged."""
    runs: list[tuple[int, int]] = []
    for c, k in zip(chunks, copy):
        if not k:
            continue
        if runs and runs[-1][1] == c.start:
            runs[-1] = (runs[-1][0], c.end)
        else:
            runs.append((c.start, c.end))
    return runs


class Backend(ABC):
    """One device's memory and copy engine."""

    device: torch.device
    page_bytes: int

    @abstractmethod
    def create_pages(self, count: int) -> None:
        """Reserve ``count`` physical pages of ``page_bytes`` (once, at start)."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve a virtual range of whole pages; returns its base address."""

    @abstractmethod
    def release(self, va: int, nbytes: int) -> None:
        """Give a virtual range back (its slots must be unmapped)."""

    @abstractmethod
    def map(self, va: int, page: int) -> None:
        """Map physical page ``page`` at ``va`` (one page long), readable and writable."""

    @abstractmethod
    def unmap(self, va: int) -> None:
        """Unmap the page at ``va``; the physical page stays in the pool."""

    @abstractmethod
    def view(self, va: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor on the device over ``[va, va + nbytes)`` (not owning it)."""

    @abstractmethod
    def pin(self, host: torch.Tensor) -> None:
        """Page-lock a host buffer for fast DMA (no-op where that means nothing)."""

    @abstractmethod
    def unpin(self, host: torch.Tensor) -> None:
        """Undo :meth:`pin` before the buffer is unmapped."""

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A request's input on the device (``x`` itself where it is there already)."""
        return x.to(self.device)

    def fetch(self, dst_va: int, host: torch.Tensor, chunks: Sequence[Chunk], copy: Sequence[bool]) -> None:
        """Copy ``host[c.start:c.end]`` to ``dst_va + c.start`` for each chunk with ``copy[i]``, in the order of
        the calling thread's current compute stream (what it launches next sees the bytes), not on the copy
        stream: a side lane bringing a model in beside the first lane's swap (see ``CudaBackend.fetch``)."""
        for a, b in copy_runs(chunks, copy):
            self.view(dst_va + a, b - a).copy_(host[a:b])

    def export_pages(self) -> list[int]:
        """File descriptors through which another process can map this device's pages (see
        :meth:`import_peer`); the caller closes them. Raises :class:`BackendError` where pages cannot be shared."""
        raise BackendError(f"{self.device} cannot share its pages")

    def import_peer(self, peer: int, fds: Sequence[int]) -> None:
        """Map the pages a peer device exported (:meth:`export_pages`, in its order), read-only in use, so that
        :meth:`fetch_peer` can copy from them. The caller closes ``fds``."""
        raise BackendError(f"{self.device} cannot map a peer's pages")

    def has_peer(self, peer: int) -> bool:
        """Whether ``peer``'s pages are mapped here (:meth:`import_peer`, not dropped since)."""
        return False

    def drop_peer(self, peer: int) -> None:
        """Unmap the pages of ``peer`` that :meth:`import_peer` mapped (nothing where none are); no copy from
        them may be in flight (:meth:`SwapEngine.drop_peer` sees to that)."""

    def peer_view(self, peer: int, page: int, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of an imported peer's page ``page`` from ``offset``, as a uint8 tensor on this device."""
        raise BackendError(f"{self.device} has no pages of peer {peer}")

    def fetch_peer(self, dst_va: int, peer: int, pages: Sequence[int], chunks: Sequence[Chunk],
                   copy: Sequence[bool]) -> None:
        """Copy the chunks with ``copy[i]`` of a model from a peer that holds it whole — its slot s in the
        peer's page ``pages[s]`` — to ``dst_va``, in the order of the calling thread's current compute stream
        (what it launches next sees the bytes). A model's range is whole pages, so chunks split at slots."""
        page = self.page_bytes
        dst = self.view(dst_va, chunks[-1].end)  # the model's range, viewed once
        for a, b in copy_runs(chunks, copy):
            while a < b:
                slot, off = divmod(a, page)
                n = min(b, (slot + 1) * page) - a
                dst[a:a + n].copy_(self.peer_view(peer, pages[slot], off, n))
                a += n

    @abstractmethod
    def start_copies(self, dst_va: int, host: torch.Tensor, chunks: Sequence[Chunk], copy: Sequence[bool],
                     events: object | None = None) -> Waiter:
        """Start copying ``host[c.start:c.end]`` to ``dst_va + c.start`` for each chunk with ``copy[i]``,
        in order, without blocking. ``events`` is a reusable per-model event set from :meth:`new_events`."""

    @abstractmethod
    def new_events(self, count: int) -> object | None:
        """Reusable per-chunk completion events for one model (None where the backend needs none)."""

    @abstractmethod
    def new_stream(self) -> object | None:
        """Another compute stream, for a lane that runs beside the first (None where streams mean nothing)."""

    @abstractmethod
    def compute(self, stream: object | None = None) -> object:
        """A context manager under which compute runs: on ``stream``, or the compute stream (CUDA)."""

    @abstractmethod
    def synchronize(self, stream: object | None = None) -> None:
        """Block until the work issued to ``stream`` (default: to the whole device) has finished."""

    def device_lost(self) -> bool:
        """Whether the device can no longer run anything (after a command failed): on a GPU, a kernel's fault
        leaves the process's CUDA context failing every call from then on. A CPU cannot be lost this way."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Free every page (all ranges must be released first)."""
