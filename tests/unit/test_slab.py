"""A batch's inputs written into the IO slab: each input's rows, every request's after the last, read back as the
tensors the worker will see — whatever the datatype, the layout of the pieces, or a piece unlike the first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swapserve.node.slab import ALIGN, Slab

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool)


@pytest.fixture
def slab(tmp_path: Path) -> Slab:
    s = Slab(tmp_path / "slab", 1 << 20, create=True)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_reads_back_as_its_pieces_concatenated(slab: Slab, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 3, 5, generator=g) * 50).to(dtype)
    b = (torch.randn(1, 5, 3, generator=g) * 50).to(dtype).transpose(1, 2)  # not contiguous
    scalar = torch.tensor(3).to(dtype)
    slab.buffer.fill_(0xAB)
    refs, end = slab.write_batch([[a, b], [scalar]], ALIGN, 1 << 19)
    assert torch.equal(slab.tensor(refs[0]), torch.cat([a, b]))
    assert torch.equal(slab.tensor(refs[1]), scalar) and refs[1].shape == ()
    assert refs[0].offset == ALIGN and refs[1].offset % ALIGN == 0 and end % ALIGN == 0
    written = refs[0].offset + 3 * 3 * 5 * dtype.itemsize
    assert bool((slab.buffer[written:refs[1].offset] == 0xAB).all())  # nothing past the first input's rows
    assert bool((slab.buffer[:ALIGN] == 0xAB).all())


def test_a_piece_of_another_datatype_is_cast_as_its_rows(slab: Slab) -> None:
    refs, _ = slab.write_batch([[torch.ones(1, 4), torch.full((1, 4), 7, dtype=torch.int32)]], 0, 1 << 19)
    assert refs[0].dtype == "float32"
    assert torch.equal(slab.tensor(refs[0]), torch.tensor([[1.0] * 4, [7.0] * 4]))


def test_a_piece_of_another_shape_is_refused(slab: Slab) -> None:
    with pytest.raises(RuntimeError):
        slab.write_batch([[torch.ones(1, 4), torch.ones(1, 2, 2)]], 0, 1 << 19)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.int64, torch.bool), ids=str)
def test_rows_are_copied_out_of_the_slab(slab: Slab, dtype: torch.dtype) -> None:
    batch = (torch.arange(4 * 2 * 3) % 7).reshape(4, 2, 3).to(dtype)
    (ref, scalar), _ = slab.write_batch([[batch], [torch.tensor(5).to(dtype)]], 0, 1 << 19)
    middle, none, whole = slab.rows(ref, 1, 2), slab.rows(ref, 4, 0), slab.rows(scalar, 0, 1)
    assert torch.equal(middle, batch[1:3]) and middle.dtype == dtype
    assert none.shape == (0, 2, 3) and none.dtype == dtype
    assert torch.equal(whole, torch.tensor(5).to(dtype)) and whole.shape == ()
    slab.buffer.fill_(0)  # the next run overwrites the region: the rows taken stay as they were
    assert torch.equal(middle, batch[1:3]) and torch.equal(whole, torch.tensor(5).to(dtype))


def test_scalar_pieces_of_a_batch_stay_in_their_place(slab: Slab) -> None:
    slab.buffer.fill_(0xAB)
    refs, end = slab.write_batch([[torch.tensor(1.0), torch.tensor(2.0)]], 0, 1 << 19)
    assert refs[0].shape == () and end == ALIGN
    assert bool((slab.buffer[4:ALIGN] == 0xAB).all())  # one element written, as the tensor path writes it
