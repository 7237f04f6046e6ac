"""The host store: every model's weights in one contiguous buffer in shared memory.

Each buffer holds a model's weights in first-use order (see :mod:`swapserve.engine.layout`), in a
file under a shared-memory directory (``/dev/shm``) so every worker process of the node can map it;
each worker page-locks its mapping for fast DMA. The store has a capacity: beyond it, the least
valuable unpinned models drop back to disk — their artifact's safetensors file, read through a
memory map — and come back on demand.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from swapserve.artifact.load import Artifact
from swapserve.engine.layout import Layout
from swapserve.errors import ArtifactError, CapacityError, NotFoundError, PoolBusyError

log = logging.getLogger(__name__)

CLOSE_THREADS = 8
"""Buffers released at once when the store closes."""

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class HostState(enum.Enum):
    MEMORY = "memory"
    """In shared memory, ready to copy to a device."""
    DISK = "disk"
    """Only in the artifact's safetensors file; loaded back on demand."""
    FILLING = "filling"
    """Being written into shared memory by :meth:`HostStore.add` (pinned meanwhile; counts toward the capacity)."""


@dataclass
class HostEntry:
    key: str
    artifact: Artifact
    layout: Layout
    state: HostState = HostState.DISK
    buffer: torch.Tensor | None = None
    """uint8 view of the shared-memory buffer while in memory."""
    pins: int = 0
    last_used: float = 0.0
    loads: int = 0
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


SpillListener = Callable[[HostEntry], None]


class HostStore:
    """The node's shared-memory model buffers.

    One process owns the store (fills buffers, enforces the capacity, spills); worker processes open it
    with ``attach=True``: they map the owner's buffers on first use and unmap them when told, never
    writing or deleting anything. Spill listeners run before a buffer is unmapped (a device backend
    unpins it there).
    """

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int, align: int = 512,
                 value: Callable[[HostEntry], float] | None = None, clock: Callable[[], float] = time.monotonic,
                 attach: bool = False):
        self.attach = attach
        self.root = Path(root)
        self.capacity = capacity_bytes
        self.align = align
        self.value = value or (lambda e: e.last_used)
        self.clock = clock
        self._entries: dict[str, HostEntry] = {}
        self._listeners: list[SpillListener] = []
        self._lock = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True)
        self.spills = 0

    # --- registry of models -------------------------------------------------------------------

    def add(self, key: str, artifact: Artifact, load: bool = True) -> HostEntry:
        if not _KEY.fullmatch(key):
            raise ArtifactError(f"invalid model key {key!r}: use letters, digits, '_', '.', '-' (max 128)")
        with self._lock:
            if key in self._entries:
                raise ArtifactError(f"model {key!r} is already in the host store")
            entry = HostEntry(key, artifact, Layout.of(artifact.manifest, self.align))
            if self.attach:
                self._entries[key] = entry
                return entry
            if entry.nbytes > self.capacity:
                raise CapacityError(f"model {key!r} ({entry.nbytes / 2**20:.1f} MiB) is larger than the host store "
                                    f"({self.capacity / 2**20:.0f} MiB)")
            self._entries[key] = entry
            if not load:
                return entry
            try:
                self._make_room(entry.nbytes, key)
            except BaseException:
                del self._entries[key]
                raise
            entry.state, entry.pins = HostState.FILLING, 1
        # The fill runs outside the lock, so that several adds (the node's start brings hundreds of models up,
        # several at a time) write side by side: it is system calls that release the GIL.
        try:
            mm = self._fill(entry)
        except BaseException:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            raise
        with self._lock:
            if self._entries.get(key) is not entry:  # the store was closed meanwhile (the node stopping)
                self._release(key, mm)
                raise NotFoundError(f"the host store closed while {key!r} was loading")
            entry.pins = 0
            self._mapped(entry, mm)
        return entry

    def remove(self, key: str) -> None:
        with self._lock:
            entry = self.get(key)
            if entry.pins:
                raise PoolBusyError(f"model {key!r} is in use")
            self._spill(entry)
            del self._entries[key]

    def has(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> HostEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise NotFoundError(f"no model {key!r} in the host store") from None

    def entries(self) -> list[HostEntry]:
        with self._lock:
            return list(self._entries.values())

    def subscribe(self, listener: SpillListener) -> None:
        self._listeners.append(listener)

    # --- use ----------------------------------------------------------------------------------

    def acquire(self, key: str) -> HostEntry:
        """Pin a model's buffer in memory (loading it back from disk if it was spilled)."""
        with self._lock:
            entry = self.get(key)
            if entry.state is HostState.FILLING:
                raise PoolBusyError(f"model {key!r} is still being loaded into the host store")
            if entry.state is HostState.DISK:
                self._load(entry)
            entry.pins += 1
            entry.last_used = self.clock()
            return entry

    def release(self, key: str) -> None:
        with self._lock:
            entry = self.get(key)
            assert entry.pins > 0
            entry.pins -= 1

    def spill(self, key: str) -> None:
        """Drop a model's shared-memory copy; it comes back from its safetensors file on demand."""
        with self._lock:
            entry = self.get(key)
            if entry.pins:
                raise PoolBusyError(f"model {key!r} is in use")
            self._spill(entry)

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.state is not HostState.DISK)

    def path(self, key: str) -> Path:
        """The shared-memory file of a model's buffer (what an attached store maps)."""
        return self._path(key)

    def close(self) -> None:
        with self._lock:
            detached = [d for e in self._entries.values() if (d := self._detach(e)) is not None]
            self._entries.clear()
        # Freeing a buffer's pages is the kernel's work when its file goes (~35 ms per 230 MB on the CI box: a
        # minute for a 1500-function node's 345 GB, longer than a stop may take), with the GIL released:
        # several at once.
        with ThreadPoolExecutor(max_workers=CLOSE_THREADS) as pool:
            list(pool.map(lambda d: self._release(*d), detached))
        if not self.attach:
            try:
                self.root.rmdir()
            except OSError:
                pass

    # --- internals ----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def _make_room(self, nbytes: int, for_key: str) -> None:
        spillable = sum(e.nbytes for e in self._entries.values() if e.state is HostState.MEMORY and not e.pins)
        if self.used_bytes - spillable + nbytes > self.capacity:  # refuse before spilling anything
            raise PoolBusyError(f"host store full: cannot load {for_key!r} ({nbytes / 2**20:.1f} MiB) while the models "
                                "in use hold the rest; retry when they finish")
        while self.used_bytes + nbytes > self.capacity:
            victims = sorted((e for e in self._entries.values() if e.state is HostState.MEMORY and not e.pins),
                             key=self.value)
            if not victims:
                raise PoolBusyError(f"host store full: cannot load {for_key!r} ({nbytes / 2**20:.1f} MiB) while every "
                                    "model in memory is in use")
            log.info("host store: spilling %s to disk to make room for %s", victims[0].key, for_key)
            self._spill(victims[0])
            self.spills += 1
        free = shutil.disk_usage(self.root).free
        if free < nbytes:
            raise CapacityError(f"{self.root} has {free / 2**20:.0f} MiB free, {for_key!r} needs "
                                f"{nbytes / 2**20:.1f} MiB; enlarge it or lower the host store capacity")

    def _load(self, entry: HostEntry) -> None:
        """Back from disk (a spilled model), under the lock."""
        if self.attach:
            self._map_existing(entry)
            return
        self._make_room(entry.nbytes, entry.key)
        self._mapped(entry, self._fill(entry))

    def _fill(self, entry: HostEntry) -> mmap.mmap:
        """Write the model's buffer file from its safetensors file and map it. The bytes go by ``pwrite``,
        one call per tensor: the kernel copies from the artifact's page cache into shared memory with the GIL
        released (writing through a fresh map instead took a page fault per 4 KiB with the GIL held: 0.8-1.0
        GB/s on the CI box however many models filled at once)."""
        path = self._path(entry.key)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, entry.nbytes)  # the padding between tensors reads as zeros
            with entry.artifact.open_weights() as st:
                for slot in entry.layout.slots:
                    if slot.nbytes:
                        _pwrite_all(fd, st.bytes_of(slot.name), slot.offset)
            mm = mmap.mmap(fd, entry.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return mm

    def _mapped(self, entry: HostEntry, mm: mmap.mmap) -> None:
        entry._map = mm
        entry.buffer = torch.frombuffer(mm, dtype=torch.uint8)
        entry.state = HostState.MEMORY
        entry.loads += 1

    def _map_existing(self, entry: HostEntry) -> None:
        path = self._path(entry.key)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise NotFoundError(f"the host copy of {entry.key!r} is not in {self.root}: the node loads it before "
                                "dispatching work for it") from None
        try:
            size = os.fstat(fd).st_size
            if size != entry.nbytes:
                raise ArtifactError(f"host copy of {entry.key!r} is {size} bytes, its layout needs {entry.nbytes}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._mapped(entry, mm)

    def _spill(self, entry: HostEntry) -> None:
        if (detached := self._detach(entry)) is not None:
            self._release(*detached)

    def _detach(self, entry: HostEntry) -> tuple[str, mmap.mmap | None] | None:
        """The entry back to disk state (spill listeners first); returns its key and map to release."""
        if entry.state is not HostState.MEMORY:
            return None
        for listener in self._listeners:
            listener(entry)
        entry.buffer = None
        entry.state = HostState.DISK
        mm, entry._map = entry._map, None
        return entry.key, mm

    def _release(self, key: str, mm: mmap.mmap | None) -> None:
        """Unmap a detached buffer and (owner only) delete its file, which frees its pages."""
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the map goes with it
                log.debug("host store: %s still has live views; unmapped when they go", key)
        if not self.attach:
            self._path(key).unlink(missing_ok=True)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
