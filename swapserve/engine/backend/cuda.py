"""The CUDA backend: CUDA virtual memory management and a copy stream, through the driver API
(``cuda-bindings``).

The pool is many page-sized physical allocations (``cuMemCreate``); ``cuMemMap`` maps whole
allocations only, so a page is the unit of placement. Measured on an H200 (bench/results): a map
costs ~5 µs, granting access ~35-45 µs and an unmap ~22 µs per page whatever its size, which is why
pages are large and mappings are kept after eviction.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from swapserve.engine.backend.base import Backend, Waiter, copy_runs, effective_chunks
from swapserve.engine.layout import Chunk
from swapserve.errors import BackendError, CapacityError

log = logging.getLogger(__name__)


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        raise BackendError("the CUDA backend needs cuda-bindings: pip install 'swapserve[cuda]'") from None
    return driver


def check(result: Any) -> Any:
    """Unpack a cuda-bindings result tuple, raising :class:`BackendError` on a driver error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cu = _driver()
        _, msg = cu.cuGetErrorString(err)
        raise BackendError(f"CUDA driver error {int(err)} ({err}): {msg.decode() if msg else '?'}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


_pin_lock = threading.Lock()
_pin_counts: dict[int, int] = {}
"""Host registration is per process, so several backends (devices) share one count per buffer."""
_pin_sizes: dict[int, tuple[int, int]] = {}
_pin_bases: list[int] = []
"""The registered buffers' (bytes, device address) by base address, and their bases sorted (to find the one
holding a tensor)."""

INLINE_BYTES = 4096
"""Inputs this small go by ``tensor.to``: the driver writes them into the command stream rather than queueing
them on a copy engine (a 4 KiB one took 0.12 ms beside a 640 MiB swap on the H200), and it is the cheaper call."""

_DEVICEMAP = 0x02
"""CU_MEMHOSTREGISTER_DEVICEMAP: kernels may read the buffer over the bus."""


def _bitwise_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy uint8 ``src`` into uint8 ``dst`` (same length) by a kernel, in the widest words that fit both."""
    n = src.numel()
    dt = next(dt for dt in (torch.int64, torch.int32, torch.int16, torch.uint8)
              if not n % dt.itemsize and not src.data_ptr() % dt.itemsize and not dst.data_ptr() % dt.itemsize)
    torch.bitwise_or(src.view(dt), 0, out=dst.view(dt))


class _ArrayInterface:
    """Lets torch wrap device memory it does not own."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def wrap_device_memory(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``[ptr, ptr + nbytes)`` of device memory, not owning it."""
    return torch.as_tensor(_ArrayInterface(ptr, nbytes), device=device)


class CudaWaiter(Waiter):
    def __init__(self, events: list[torch.cuda.Event], copied: Sequence[bool]):
        self._events = events
        self._eff = effective_chunks(copied)
        self._last = self._eff[-1] if self._eff else -1

    def wait(self, chunk: int) -> None:
        j = self._eff[chunk]
        if j >= 0:
            torch.cuda.current_stream().wait_event(self._events[j])

    def finish(self) -> None:
        if self._last >= 0:
            self._events[self._last].synchronize()


class CudaBackend(Backend):
    def __init__(self, device: str, page_bytes: int):
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for, but CUDA is not available")
        self.device = torch.device(device)
        self.index = self.device.index or 0
        self.page_bytes = page_bytes
        torch.cuda.set_device(self.index)
        torch.zeros(1, device=self.device)  # create the primary context
        cu = _driver()
        self._cu = cu
        self._ctx = check(cu.cuCtxGetCurrent())
        self._local = threading.local()
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.index
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._prop = prop
        self.shareable = True
        """Pages made exportable as file descriptors (for peers' copies); False where the driver refused."""
        gran = check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        if page_bytes % int(gran):
            raise BackendError(f"page_bytes {page_bytes} is not a multiple of the device granularity {int(gran)}")
        acc = cu.CUmemAccessDesc()
        acc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        acc.location.id = self.index
        acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [acc]
        self._pages: list[Any] = []
        self._peers: dict[int, tuple[int, int, torch.Tensor]] = {}
        """Imported peers' pools: (reserved address, bytes, a tensor over them on this device)."""
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}
        """Device views of registered host buffers, by (host base, device address): made once, then sliced
        for each upload (wrapping memory through ``__cuda_array_interface__`` is a slow Python call)."""

    def _ensure_ctx(self) -> None:
        # Driver calls use the calling thread's current context; torch only sets it on threads that
        # ran a runtime call, so set it here once per thread.
        if not getattr(self._local, "ok", False):
            check(self._cu.cuCtxSetCurrent(self._ctx))
            self._local.ok = True

    def create_pages(self, count: int) -> None:
        self._ensure_ctx()
        if count:
            try:
                self._pages.append(check(self._cu.cuMemCreate(self.page_bytes, self._prop, 0)))
            except BackendError as e:  # no shareable pages here: plain ones (peers then copy through the host)
                log.warning("%s: pages cannot be made shareable (%s); peer copies are off", self.device, e)
                self.shareable = False
                self._prop.requestedHandleTypes = self._cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        for i in range(len(self._pages), count):
            try:
                self._pages.append(check(self._cu.cuMemCreate(self.page_bytes, self._prop, 0)))
            except BackendError as e:
                have = len(self._pages)
                for h in self._pages:
                    check(self._cu.cuMemRelease(h))
                self._pages.clear()
                raise CapacityError(f"could reserve only {have} of {count} pages of {self.page_bytes >> 20} MiB on "
                                    f"{self.device}: {e}; lower pool_bytes") from None

    def reserve(self, nbytes: int) -> int:
        self._ensure_ctx()
        size = -(-nbytes // self.page_bytes) * self.page_bytes
        return int(check(self._cu.cuMemAddressReserve(size, self.page_bytes, 0, 0)))

    def release(self, va: int, nbytes: int) -> None:
        self._ensure_ctx()
        size = -(-nbytes // self.page_bytes) * self.page_bytes
        check(self._cu.cuMemAddressFree(va, size))

    def map(self, va: int, page: int) -> None:
        self._ensure_ctx()
        check(self._cu.cuMemMap(va, self.page_bytes, 0, self._pages[page], 0))
        check(self._cu.cuMemSetAccess(va, self.page_bytes, self._access, 1))

    def unmap(self, va: int) -> None:
        self._ensure_ctx()
        check(self._cu.cuMemUnmap(va, self.page_bytes))

    def view(self, va: int, nbytes: int) -> torch.Tensor:
        return wrap_device_memory(va, nbytes, self.device)

    def pin(self, host: torch.Tensor) -> None:
        self._ensure_ctx()
        ptr = host.data_ptr()
        with _pin_lock:
            if not _pin_counts.get(ptr):
                nbytes = host.numel() * host.element_size()
                check(self._cu.cuMemHostRegister(ptr, nbytes, _DEVICEMAP))
                _pin_sizes[ptr] = nbytes, int(check(self._cu.cuMemHostGetDevicePointer(ptr, 0)))
                bisect.insort(_pin_bases, ptr)
            _pin_counts[ptr] = _pin_counts.get(ptr, 0) + 1

    def unpin(self, host: torch.Tensor) -> None:
        self._ensure_ctx()
        ptr = host.data_ptr()
        with _pin_lock:
            n = _pin_counts.get(ptr, 0)
            if n == 1:
                check(self._cu.cuMemHostUnregister(ptr))
                self._mapped.pop((ptr, _pin_sizes[ptr][1]), None)
                del _pin_counts[ptr], _pin_sizes[ptr]
                _pin_bases.remove(ptr)
            elif n > 1:
                _pin_counts[ptr] = n - 1

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A request's input on the device. From registered host memory (a worker's IO slab) a kernel reads
        it over the bus instead of a copy engine copying it: the copy engines work through their queue in
        order, so behind a swap's queued copies in another lane a 64 KiB-1.2 MiB input waited 8-10 ms on an
        H200, where the kernel took 0.25-0.4 ms (bench/copy_queue.py). The bytes are the same either way."""
        nbytes = x.numel() * x.element_size()
        if x.device.type != "cpu" or not x.is_contiguous() or nbytes <= INLINE_BYTES:
            return x.to(self.device)
        src = self._mapped_view(x)
        if src is None:
            return x.to(self.device)
        out = torch.empty(x.shape, dtype=x.dtype, device=self.device)
        _bitwise_copy(src, out.view(-1).view(torch.uint8))
        return out

    def fetch(self, dst_va: int, host: torch.Tensor, chunks: Sequence[Chunk], copy: Sequence[bool]) -> None:
        """By kernel, from the registered host buffer over the bus, in the current stream's order. The copy
        engines serve queued copies in order, so a copy engine copy beside a swap waits for the whole swap;
        a kernel's reads share the link with it instead: on an H200, 100 MiB took 2.5 ms alone and 2.7 ms
        beside a 640 MiB swap, which took 15.2 ms instead of 13.1 (``bench/copy_queue.py``)."""
        src = self._mapped_view(host)
        if src is None:
            raise BackendError("fetch needs a registered host buffer (pin it first)")
        for a, b in copy_runs(chunks, copy):
            _bitwise_copy(src[a:b], self.view(dst_va + a, b - a))

    def _mapped_view(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x``'s bytes as a device tensor reading registered host memory over the bus (None if ``x`` does
        not lie in a registered buffer)."""
        nbytes = x.numel() * x.element_size()
        ptr = x.data_ptr()
        whole = None
        with _pin_lock:
            i = bisect.bisect_right(_pin_bases, ptr) - 1
            base = _pin_bases[i] if i >= 0 else 0
            size, dev_base = _pin_sizes[base] if i >= 0 else (0, 0)
            if i >= 0 and ptr + nbytes <= base + size:
                whole = self._mapped.get((base, dev_base))
                if whole is None:
                    whole = self._mapped[base, dev_base] = wrap_device_memory(dev_base, size, self.device)
        if whole is None:
            return None
        return whole[ptr - base:ptr - base + nbytes]

    def export_pages(self) -> list[int]:
        if not self.shareable:
            raise BackendError(f"{self.device}'s pages are not shareable")
        self._ensure_ctx()
        fd_type = self._cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        fds: list[int] = []
        try:
            for h in self._pages:
                fds.append(int(check(self._cu.cuMemExportToShareableHandle(h, fd_type, 0))))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def import_peer(self, peer: int, fds: Sequence[int]) -> None:
        """Import each page, map them side by side into one reserved range (page p at p × page_bytes) and grant
        this device access; the range holds the allocations (the handles are released at once)."""
        if peer in self._peers:
            raise BackendError(f"peer {peer} is imported already")
        self._ensure_ctx()
        cu = self._cu
        fd_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        size = len(fds) * self.page_bytes
        va = int(check(cu.cuMemAddressReserve(size, self.page_bytes, 0, 0)))
        mapped = 0
        try:
            for fd in fds:
                h = check(cu.cuMemImportFromShareableHandle(fd, fd_type))
                try:
                    check(cu.cuMemMap(va + mapped * self.page_bytes, self.page_bytes, 0, h, 0))
                finally:
                    check(cu.cuMemRelease(h))
                mapped += 1
            check(cu.cuMemSetAccess(va, size, self._access, 1))
        except BaseException:
            for i in range(mapped):
                check(cu.cuMemUnmap(va + i * self.page_bytes, self.page_bytes))
            check(cu.cuMemAddressFree(va, size))
            raise
        self._peers[peer] = va, size, wrap_device_memory(va, size, self.device)

    def has_peer(self, peer: int) -> bool:
        return peer in self._peers

    def drop_peer(self, peer: int) -> None:
        if peer not in self._peers:
            return
        self._ensure_ctx()
        va, size, _ = self._peers.pop(peer)
        for off in range(0, size, self.page_bytes):
            check(self._cu.cuMemUnmap(va + off, self.page_bytes))
        check(self._cu.cuMemAddressFree(va, size))

    def peer_view(self, peer: int, page: int, offset: int, nbytes: int) -> torch.Tensor:
        if peer not in self._peers:
            raise BackendError(f"peer {peer}'s pages are not imported here")
        start = page * self.page_bytes + offset
        return self._peers[peer][2][start:start + nbytes]

    def new_events(self, count: int) -> list[torch.cuda.Event]:
        return [torch.cuda.Event() for _ in range(count)]

    def start_copies(self, dst_va: int, host: torch.Tensor, chunks: Sequence[Chunk], copy: Sequence[bool],
                     events: object | None = None) -> Waiter:
        self._ensure_ctx()
        assert isinstance(events, list) and len(events) >= len(chunks)
        src = host.data_ptr()
        stream = self.copy_stream
        handle = stream.cuda_stream
        memcpy = self._cu.cuMemcpyHtoDAsync
        for i, c in enumerate(chunks):
            if copy[i]:
                err, = memcpy(dst_va + c.start, src + c.start, c.nbytes, handle)
                if int(err) != 0:
                    check((err,))
                events[i].record(stream)
        return CudaWaiter(events, copy)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    @contextlib.contextmanager
    def compute(self, stream: object | None = None) -> Iterator[None]:
        s = stream if isinstance(stream, torch.cuda.Stream) else self.compute_stream
        current = torch.cuda.current_stream(self.device)
        if current != s:  # work the caller queued on its own stream (its inputs) comes first
            s.wait_stream(current)
        with torch.cuda.stream(s):
            yield

    def device_lost(self) -> bool:
        """A sticky error (an illegal address, a launch failure, a device-side assert) fails every later call
        of the context, this one too; an error of the call alone (out of memory, a bad argument) does not. Does
        not wait for the device."""
        try:
            torch.cuda.current_stream(self.device).query()
        except RuntimeError:  # torch.AcceleratorError (a RuntimeError) since 2.8, RuntimeError before
            return True
        return False

    def synchronize(self, stream: object | None = None) -> None:
        if isinstance(stream, torch.cuda.Stream):
            stream.synchronize()
        else:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._ensure_ctx()
        self.synchronize()
        for peer in list(self._peers):
            self.drop_peer(peer)
        for h in self._pages:
            check(self._cu.cuMemRelease(h))
        self._pages.clear()
