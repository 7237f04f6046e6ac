"""CUDA graphs of one model at one batch size: a plain one for a resident model, and a swap one
holding the chunked host→device copies (on the copy stream, an event per chunk) and the forward
pass that waits for each chunk before its first use.

Graphs bake in addresses. The weights live at the model's fixed virtual range (whatever physical
pages back it), activations in a lane's workspace pool, the copy sources at the model's pinned host
buffer (a reload from disk moves it: the swap graph is then captured again). For a partly resident
model the swap graph runs with the copy nodes of valid chunks disabled (``cudaGraphNodeSetEnabled``),
so only missing bytes move.

Lanes: the swap graph belongs to lane 0 (its stream and workspace), and each side lane (1, 2, ...) has a
plain graph of its own (its activations in that lane's workspace: side lanes run at once). With one lane
both live in lane 0 and a resident run replays the plain graph; with more, each side lane replays its plain
graph while lane 0 may be swapping another model in, and a resident run in lane 0 replays the swap graph
with every copy disabled — the same kernels on the same weights, so the same bits.
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

    Its block goes back to the lane's workspace pool, where later captures may use it as scratch. That is
    safe because a lane runs one graph at a time and a replay's outputs are copied out before the next
    replay: between replays every graph's static memory is garbage. So a workspace holds the largest
    model's activations, not the sum over all captured graphs."""
    if not t.is_contiguous() or t.numel() == 0:
        return t
    return wrap_device_memory(t.data_ptr(), t.numel() * t.element_size(), t.device).view(t.dtype).view(t.shape)


class _Placed:
    """Where a graph runs: a lane's stream and workspace pool."""

    def __init__(self, lane: Any):
        self.stream: torch.cuda.Stream = lane.stream
        self.pool: torch.cuda.MemPool = lane.workspace


class _Plain:
    """A lane's plain graph (a resident run), with its static inputs and outputs."""

    def __init__(self, lane: _Placed):
        self.lane = lane
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []


class ModelGraphs:
    def __init__(self, backend: CudaBackend, program: Program, lanes: Sequence[Any]):
        """``lanes``: the engine's lanes (each with ``stream`` and ``workspace``)."""
        self.backend = backend
        self.program = program
        self.swap_lane = _Placed(lanes[0])
        self.shared = len(lanes) == 1
        """One lane: a resident run in lane 0 replays the plain graph (it lives there too)."""
        self.plain: list[_Plain] = [_Plain(_Placed(ln)) for ln in (lanes if self.shared else lanes[1:])]
        """The plain graph of each side lane (of lane 0 when it is the only one)."""
        self.swap: torch.cuda.CUDAGraph | None = None
        self.swap_in: list[torch.Tensor] = []
        self.swap_out: list[torch.Tensor] = []
        self.swap_host_ptr = 0
        self._nodes: list[Any] | None = None
        self._enabled: list[bool] = []

    def capture(self, example: Sequence[torch.Tensor], va: int, host: torch.Tensor, chunks: Sequence[Chunk],
                events: list[torch.cuda.Event]) -> None:
        """Capture every graph, each with its static inputs and outputs in its lane's workspace (then
        borrowed)."""
        for p in self.plain:
            at = p.lane
            with torch.cuda.use_mem_pool(at.pool), torch.cuda.stream(at.stream):
                inputs = [torch.empty_like(x, device=self.backend.device) for x in example]
            at.stream.wait_stream(torch.cuda.current_stream(self.backend.device))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=at.pool.id, stream=at.stream):
                out = self.program.run(inputs)
            p.graph, p.inputs, p.outputs = g, [_borrow(t) for t in inputs], [_borrow(t) for t in out]
            del inputs, out
        self.capture_swap(va, host, chunks, events, example)

    def capture_swap(self, va: int, host: torch.Tensor, chunks: Sequence[Chunk], events: list[torch.cuda.Event],
                     example: Sequence[torch.Tensor] | None = None) -> None:
        """(Re)capture the swap graph, with static inputs of its own (shaped like ``example``, or like the
        previous capture's)."""
        b, at = self.backend, self.swap_lane
        like = list(example) if example is not None else self.swap_in
        with torch.cuda.use_mem_pool(at.pool), torch.cuda.stream(at.stream):
            inputs = [torch.empty_like(x, device=b.device) for x in like]
        at.stream.wait_stream(torch.cuda.current_stream(b.device))
        g = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(g, pool=at.pool.id, stream=at.stream):
            cur = torch.cuda.current_stream()
            b.copy_stream.wait_stream(cur)
            waiter = b.start_copies(va, host, chunks, [True] * len(chunks), events)
            out = self.program.run(inputs, waiter)
            cur.wait_stream(b.copy_stream)
        if hasattr(g, "instantiate"):
            g.instantiate()
        self._nodes = _memcpy_nodes(g, va, chunks)
        if self._nodes is None:
            log.warning("copy nodes not found in the swap graph: partly resident models will copy every chunk")
        self._enabled = [True] * len(chunks)
        self.swap, self.swap_host_ptr = g, host.data_ptr()
        self.swap_in, self.swap_out = [_borrow(t) for t in inputs], [_borrow(t) for t in out]
        del inputs, out

    def replay(self, inputs: Sequence[torch.Tensor], copy: Sequence[bool] | None, lane: int) -> list[torch.Tensor]:
        """Run in ``lane`` (on its stream); ``copy`` None means resident. Returns fresh outputs."""
        if lane == 0 and (copy is not None or not self.shared):
            graph, static_in, static_out, at = self.swap, self.swap_in, self.swap_out, self.swap_lane
            self._set_enabled(copy if copy is not None else [False] * len(self._enabled))
        else:
            assert copy is None, "only lane 0 swaps"
            p = self.plain[0 if self.shared else lane - 1]
            graph, static_in, static_out, at = p.graph, p.inputs, p.outputs, p.lane
        assert graph is not None
        with self.backend.compute(at.stream):
            for dst, x in zip(static_in, inputs):
                dst.copy_(x, non_blocking=True)
            graph.replay()
            return [o.clone() for o in static_out]

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
