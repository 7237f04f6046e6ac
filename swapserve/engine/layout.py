"""Where each weight lives inside a model's buffer, and how the buffer is cut into copy chunks.

The same layout is used for the host buffer (pinned shared memory) and for the model's device
range, so a chunk is one contiguous host→device copy at the same offset on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from swapserve.artifact.manifest import Manifest


@dataclass(frozen=True)
class Slot:
    """One weight's place in the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One host→device copy: bytes ``[start, end)`` of the buffer; never crosses a page."""

    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]
    """In first-use order."""
    nbytes: int
    """Total buffer size (the end of the last weight, rounded up to the alignment)."""

    @classmethod
    def of(cls, manifest: Manifest, align: int) -> Layout:
        slots = []
        off = 0
        for w in manifest.weights:
            slots.append(Slot(w.name, w.dtype, w.shape, off, w.nbytes))
            off = _round_up(off + w.nbytes, align)
        return cls(tuple(slots), max(off, align))

    def chunks(self, page_bytes: int, min_chunk: int, max_chunk: int) -> tuple[Chunk, ...]:
        """Copy chunks that start small (so compute can begin early) and double up to ``max_chunk``."""
        out = []
        start, size = 0, min_chunk
        while start < self.nbytes:
            page_end = (start // page_bytes + 1) * page_bytes
            end = min(start + size, page_end, self.nbytes)
            out.append(Chunk(start, end))
            start, size = end, min(size * 2, max_chunk)
        return tuple(out)

    def pages(self, page_bytes: int) -> int:
        return -(-self.nbytes // page_bytes)


def last_chunk_of(slots: tuple[Slot, ...], chunks: tuple[Chunk, ...]) -> list[int]:
    """For each slot, the index of the chunk holding its last byte (waiting for it is enough,
    since chunks complete in order on one copy stream)."""
    out = []
    ci = 0
    for s in slots:
        last = min(s.offset + max(s.nbytes, 1) - 1, chunks[-1].end - 1)  # an empty last weight sits at the end
        while chunks[ci].end <= last:
            ci += 1
        out.append(ci)
    return out


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a
