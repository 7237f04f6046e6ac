"""CUDA graphs of one model at one batch size: a plain one for a resident model, and a swap one
holding the chunked host→device copies (on the copy stream, an event per chunk) and the forward
pass that waits for each chunk before its first use.

Graphs bake in addresses. The weights live at the model's fixed virtual range (whatever physical
pages back it), activations in the device's shared workspace pool (one model runs at a time), the
copy sources at the model's pinned host buffer (a reload from disk moves it: the swap graph is then
captured again). For a partly resident model the swap graph runs with the copy nodes of valid chunks
disabled (``cudaGraphNodeSetEnabled``), so only missing bytes move.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from swapserve.engine.backend.cuda import CudaBackend, check, wrap_device_memory
from swapserve.engine.layout import Chunk
from swapserve.engine.program import Program

log = logging.getLogger(__name__)


def _runtime() -> Any:
    from cuda.bindings import runtime

    return runtime


def _memcpy_nodes(graph: torch.cuda.CUDAGraph, va: int, chunks: Sequence[Chunk]) -> list[Any] | None:
    """The copy node of each chunk in the captured graph (None if they cannot all be found)."""
    rt = _runtime()
    raw = graph.raw_cuda_graph()
    count = check(rt.cudaGraphGetNodes(raw, 0))[1]
    nodes = check(rt.cudaGraphGetNodes(raw, count))[0]
    by_dst = {va + c.start: i for i, c in enumerate(chunks)}
    found: list[Any] = [None] * len(chunks)
    for node in nodes:
        if check(rt.cudaGraphNodeGetType(node)) != rt.cudaGraphNodeType.cudaGraphNodeTypeMemcpy:
            continue
        p = check(rt.cudaGraphMemcpyNodeGetParams(node))
        dst = int(p.dstPtr.ptr) + int(p.dstPos.x)
        if dst in by_dst:
            found[by_dst[dst]] = node
    return found if all(n is not None for n in found) else None


def _borrow(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s memory that does not keep it allocated.

    Its block goes back to the workspace pool, where later captures may use it as scratch. That is safe
    because graphs of one device never run concurrently and a replay's outputs are copied out before
    the next replay: between replays every graph's static memory is garbage. So the workspace holds the
    largest model's activations, not the sum over all captured graphs."""
    if not t.is_contiguous() or t.numel() == 0:
        return t
    return wrap_device_memory(t.data_ptr(), t.numel() * t.element_size(), t.device).view(t.dtype).view(t.shape)


class ModelGraphs:
    def __init__(self, backend: CudaBackend, program: Program, pool: torch.cuda.MemPool):
        self.backend = backend
        self.program = program
        self.pool = pool
        self.inputs: list[torch.Tensor] = []
        self.plain: torch.cuda.CUDAGraph | None = None
        self.plain_out: list[torch.Tensor] = []
        self.swap: torch.cuda.CUDAGraph | None = None
        self.swap_out: list[torch.Tensor] = []
        self.swap_host_ptr = 0
        self._nodes: list[Any] | None = None
        self._enabled: list[bool] = []

    def capture(self, example: Sequence[torch.Tensor], va: int, host: torch.Tensor, chunks: Sequence[Chunk],
                events: list[torch.cuda.Event]) -> None:
        """Capture both graphs, their static inputs and outputs in the shared workspace (then borrowed)."""
        with torch.cuda.use_mem_pool(self.pool), torch.cuda.stream(self.backend.compute_stream):
            inputs = [torch.empty_like(x, device=self.backend.device) for x in example]
        self.inputs = inputs
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool.id, stream=self.backend.compute_stream):
            out = self.program.run(self.inputs)
        self.plain, self.plain_out = g, out
        self.capture_swap(va, host, chunks, events)
        self.inputs = [_borrow(t) for t in inputs]
        self.plain_out = [_borrow(t) for t in self.plain_out]
        del inputs, out

    def capture_swap(self, va: int, host: torch.Tensor, chunks: Sequence[Chunk], events: list[torch.cuda.Event]) -> None:
        b = self.backend
        g = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(g, pool=self.pool.id, stream=b.compute_stream):
            cur = torch.cuda.current_stream()
            b.copy_stream.wait_stream(cur)
            waiter = b.start_copies(va, host, chunks, [True] * len(chunks), events)
            out = self.program.run(self.inputs, waiter)
            cur.wait_stream(b.copy_stream)
        if hasattr(g, "instantiate"):
            g.instantiate()
        self._nodes = _memcpy_nodes(g, va, chunks)
        if self._nodes is None:
            log.warning("copy nodes not found in the swap graph: partly resident models will copy every chunk")
        self._enabled = [True] * len(chunks)
        self.swap, self.swap_out, self.swap_host_ptr = g, [_borrow(t) for t in out], host.data_ptr()

    def replay(self, inputs: Sequence[torch.Tensor], copy: Sequence[bool] | None) -> list[torch.Tensor]:
        """Run on the compute stream; ``copy`` None means resident (plain graph). Returns fresh outputs."""
        with self.backend.compute():
            for dst, x in zip(self.inputs, inputs):
                dst.copy_(x, non_blocking=True)
            if copy is None:
                assert self.plain is not None
                self.plain.replay()
                outs = self.plain_out
            else:
                assert self.swap is not None
                self._set_enabled(copy)
                self.swap.replay()
                outs = self.swap_out
            return [o.clone() for o in outs]

    def _set_enabled(self, copy: Sequence[bool]) -> None:
        if self._nodes is None:
            return
        rt = _runtime()
        exec_ = self.swap.raw_cuda_graph_exec() if self.swap is not None else None
        for i, want in enumerate(copy):
            if self._enabled[i] != want:
                check(rt.cudaGraphNodeSetEnabled(exec_, self._nodes[i], int(want)))
                self._enabled[i] = want

    @property
    def exact_partial(self) -> bool:
        """Whether a partly resident swap copies only its missing chunks."""
        return self._nodes is not None
