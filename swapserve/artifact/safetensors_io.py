"""Reading safetensors files without trusting them, and without unpickling anything.

We parse the header ourselves (8-byte little-endian length, then JSON) so that a bad file gets an
error naming what is wrong, and so that weights can be copied byte-for-byte from a memory map
straight into the host store.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swapserve.errors import ArtifactError

# safetensors dtype code → (our dtype name, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class StEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Offset of the first byte in the file (absolute)."""
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _describe_non_safetensors(head: bytes) -> str:
    if head[:1] == b"\x80":
        return "it is a Python pickle (torch.save format); swapserve never unpickles weights"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (torch.save format, pickled); swapserve never unpickles weights"
    return "its header is not a safetensors header"


def read_header(path: str | os.PathLike[str]) -> dict[str, StEntry]:
    """Parse and check a safetensors file's header. Raises :class:`ArtifactError` naming the cause."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path.name} is not a valid safetensors file: it is {size} bytes long")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(_MAX_HEADER, size - 8):
                raise ArtifactError(f"{path.name} is not a valid safetensors file: {_describe_non_safetensors(head)}"
                                    + "; convert with safetensors.torch.save_file(state_dict, path)")
            raw = f.read(hlen)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path.name} is not a valid safetensors file: {_describe_non_safetensors(head)}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name} is not a valid safetensors file: header is not a JSON object")
    data_start = 8 + hlen
    entries: dict[str, StEntry] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path.name}: malformed header entry for {name!r}") from None
        if code not in ST_DTYPES:
            raise ArtifactError(f"{path.name}: tensor {name!r} has unsupported dtype {code}")
        dtype, width = ST_DTYPES[code]
        numel = 1
        for d in shape:
            if d < 0:
                raise ArtifactError(f"{path.name}: tensor {name!r} has a negative dimension")
            numel *= d
        if not (0 <= b <= e and e - b == numel * width and data_start + e <= size):
            raise ArtifactError(f"{path.name}: tensor {name!r} has bad data offsets (truncated or corrupt file)")
        entries[name] = StEntry(dtype, shape, data_start + b, data_start + e)
        spans.append((b, e))
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ArtifactError(f"{path.name}: tensors overlap in the data section (corrupt file)")
    return entries


class MappedSafetensors:
    """A read-only memory map of a checked safetensors file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries = read_header(self.path)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ) if size else None

    def bytes_of(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name`` (a read-only view into the map)."""
        e = self.entries[name]
        assert self._map is not None
        return np.frombuffer(self._map, dtype=np.uint8, count=e.nbytes, offset=e.begin)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> MappedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
