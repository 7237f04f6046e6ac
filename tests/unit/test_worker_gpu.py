"""Which GPU a worker process sees: the node numbers the GPUs it may use (``CUDA_VISIBLE_DEVICES``, as torch
does), and each worker sees only its own, by the machine's numbering (or UUID)."""

from __future__ import annotations

import pytest

from swapserve.errors import BackendError
from swapserve.node.worker import only_gpu


@pytest.mark.parametrize("index, visible, want", [
    (1, None, "1"),  # every GPU visible: the node's numbering is the machine's
    (0, "2,3", "2"), (1, "2, 3", "3"),  # a node told to use GPUs 2 and 3 uses them
    (1, "GPU-aa,GPU-bb", "GPU-bb"),  # by UUID
])
def test_a_worker_sees_the_gpu_the_node_numbered(index: int, visible: str | None, want: str) -> None:
    assert only_gpu(index, visible) == want


@pytest.mark.parametrize("visible", ["2,3", ""])
def test_a_gpu_beyond_what_the_node_may_use_is_refused(visible: str) -> None:
    with pytest.raises(BackendError, match=r"cuda:2 is not among the GPUs this node may use"):
        only_gpu(2, visible)
