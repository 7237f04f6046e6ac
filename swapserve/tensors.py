"""Tensor datatypes as the Open Inference Protocol names them, their torch/numpy counterparts, and the rule
a tensor's shape must follow to fit a declared one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

# OIP datatype → (torch dtype, numpy dtype or None where numpy has none)
_TABLE: dict[str, tuple[torch.dtype, np.dtype | None]] = {
    "BOOL": (torch.bool, np.dtype(np.bool_)),
    "UINT8": (torch.uint8, np.dtype(np.uint8)),
    "INT8": (torch.int8, np.dtype(np.int8)),
    "INT16": (torch.int16, np.dtype(np.int16)),
    "INT32": (torch.int32, np.dtype(np.int32)),
    "INT64": (torch.int64, np.dtype(np.int64)),
    "FP16": (torch.float16, np.dtype(np.float16)),
    "FP32": (torch.float32, np.dtype(np.float32)),
    "FP64": (torch.float64, np.dtype(np.float64)),
    "BF16": (torch.bfloat16, None),
}
_BY_TORCH = {t: name for name, (t, _) in _TABLE.items()}

DATATYPES = tuple(_TABLE)


def torch_dtype(datatype: str) -> torch.dtype:
    try:
        return _TABLE[datatype][0]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})") from None


def numpy_dtype(datatype: str) -> np.dtype:
    np_dtype = _TABLE.get(datatype, (None, None))[1]
    if np_dtype is None:
        raise ValueError(f"datatype {datatype!r} has no numpy equivalent")
    return np_dtype


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no OIP datatype") from None


def element_size(datatype: str) -> int:
    return torch_dtype(datatype).itemsize


def fits_shape(shape: Sequence[int], declared: Sequence[int], max_batch: int,
               batch: int | None) -> tuple[bool, int | None]:
    """Whether ``shape`` fits ``declared`` (-1: any size; a leading -1 is the batch dimension: 1 to
    ``max_batch``, and ``batch`` where earlier inputs of the same request fixed it). Returns whether it
    fits and the batch known after it."""
    ok = len(shape) == len(declared) and all(d == -1 or d == s for d, s in zip(declared, shape))
    if ok and len(declared) and declared[0] == -1:
        batch = shape[0] if batch is None else batch
        ok = shape[0] == batch and 1 <= batch <= max_batch
    return ok, batch


def names_differ(declared: Sequence[str], given: Iterable[str]) -> str:
    """``"; missing [...]; unknown [...]"`` for tensors named differently from ``declared`` ("" if none)."""
    have = set(given)
    missing, extra = sorted(set(declared) - have), sorted(have - set(declared))
    return (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
