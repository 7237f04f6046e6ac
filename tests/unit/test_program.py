"""The runnable program: the activation estimate, and the waits of the pipelined variant."""

from __future__ import annotations

import pytest
import torch

from swapserve.artifact import build_architecture_artifact, load_artifact
from swapserve.artifact.load import Artifact
from swapserve.artifact.manifest import dtype_from_name
from swapserve.engine.backend.base import Waiter
from swapserve.engine.layout import Chunk, Layout, last_chunk_of
from swapserve.engine.program import ExportedProgram, ModuleProgram, Program, load_program

CPU = torch.device("cpu")
F32 = 4
MiB = 1 << 20


class RecordingWaiter(Waiter):
    """Waits for nothing (the weights are all there); records what it was asked to wait for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def wait(self, chunk: int) -> None:
        self.calls.append(chunk)

    def finish(self) -> None:
        pass


class LazyWaiter(Waiter):
    """A copy engine that only copies when asked: ``wait(k)`` lands chunks up to ``k``, so any weight
    read before its wait still holds the 0xFF garbage the buffer started with."""

    def __init__(self, host: torch.Tensor, dev: torch.Tensor, chunks: tuple[Chunk, ...]):
        self.host, self.dev, self.chunks = host, dev, chunks
        self.done = -1
        self.calls: list[int] = []

    def wait(self, chunk: int) -> None:
        self.calls.append(chunk)
        for c in self.chunks[self.done + 1:chunk + 1]:
            self.dev[c.start:c.end] = self.host[c.start:c.end]
        self.done = max(self.done, chunk)

    def finish(self) -> None:
        self.wait(len(self.chunks) - 1)


def host_buffer(art: Artifact, layout: Layout) -> torch.Tensor:
    host = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with art.open_weights() as st:
        for s in layout.slots:
            host[s.offset:s.offset + s.nbytes] = torch.from_numpy(st.bytes_of(s.name).copy())
    return host


def bind_to(prog: Program, layout: Layout, dev: torch.Tensor) -> None:
    prog.bind({s.name: dev[s.offset:s.offset + s.nbytes].view(dtype_from_name(s.dtype)).view(s.shape)
               for s in layout.slots})


def staged(art: Artifact, page: int = 2 * MiB, lo: int = 64 << 10, hi: int = 1 * MiB):
    """A program bound to a device-like buffer laid out as the engine lays it out."""
    layout = Layout.of(art.manifest, 512)
    chunks = layout.chunks(page, lo, hi)
    weight_chunk = {s.name: c for s, c in zip(layout.slots, last_chunk_of(layout.slots, chunks))}
    prog = load_program(art, CPU, weight_chunk)
    dev = torch.empty(layout.nbytes, dtype=torch.uint8)
    bind_to(prog, layout, dev)
    return prog, layout, chunks, weight_chunk, host_buffer(art, layout), dev


# --- activation estimate -------------------------------------------------------------------------


def test_activation_estimate_of_the_mlp_by_hand(make_artifact):
    art, _, _ = make_artifact("mlp", max_batch=4)
    prog = ExportedProgram(art, CPU, {w.name: 0 for w in art.manifest.weights})
    # x[b,512] -> fc1 -> [b,1024] -> bn -> [b,1024] -> relu -> fc2 -> [b,1024] -> relu -> fc3 -> [b,10].
    # Every op reads one activation and writes one, so at most two hidden activations are alive at
    # once (the input is not an intermediate), plus the 10-wide output that is kept to the end.
    width = 1024
    a1 = prog.activation_bytes(1)
    assert 2 * width * F32 <= a1 <= 2 * width * F32 + 10 * F32
    sizes = [prog.activation_bytes(b) for b in (1, 2, 3, 4)]
    assert all(x < y for x, y in zip(sizes, sizes[1:]))
    assert sizes == [b * a1 for b in (1, 2, 3, 4)]  # every intermediate is proportional to the batch


def test_activation_estimate_of_the_tied_lm_by_hand(make_artifact):
    art, _, _ = make_artifact("tied", max_batch=4)
    prog = ExportedProgram(art, CPU, {w.name: 0 for w in art.manifest.weights})
    seq, dim, vocab = 16, 256, 4096
    a1 = prog.activation_bytes(1)
    # the head's input and its logits are alive together; nothing else is bigger than the input
    logits, hidden = seq * vocab * F32, seq * dim * F32
    assert logits + hidden <= a1 <= logits + 5 * hidden + seq * 8  # at most everything at once
    a2 = prog.activation_bytes(2)
    assert a1 < a2 <= 2 * a1


def test_activation_estimate_is_positive_for_a_static_batch(make_artifact):
    art, _, _ = make_artifact("mlp", max_batch=1)
    prog = ExportedProgram(art, CPU, {w.name: 0 for w in art.manifest.weights})
    assert prog.activation_bytes(1) > 0


# --- the pipelined variant --------------------------------------------------------------------------


def test_waits_in_first_use_order_by_hand(make_artifact):
    art, _, x = make_artifact("mlp")
    names = [w.name for w in art.manifest.weights]
    # one chunk per weight, in first-use order: fc1.w fc1.b | bn.w bn.b bn.mean bn.var | fc2.w fc2.b | fc3.w fc3.b | n
    weight_chunk = {n: i for i, n in enumerate(names)}
    prog = ExportedProgram(art, CPU, weight_chunk)
    layout = Layout.of(art.manifest, 512)
    bind_to(prog, layout, host_buffer(art, layout))
    plain = prog.run(x)
    rec = RecordingWaiter()
    waited = prog.run(x, rec)
    assert len(plain) == len(waited) == 1 and torch.equal(plain[0], waited[0])
    # before fc1: its bias (chunk 1); before bn: running_var (5); fc2: bias (7); fc3: bias (9).
    # bn.num_batches_tracked (10) is never read, so never waited for.
    assert names[9] == "fc3.bias" and names[10] == "bn.num_batches_tracked"
    assert rec.calls == [1, 5, 7, 9]


@pytest.mark.parametrize("kind", ["mlp", "tied"])
@pytest.mark.parametrize(("page", "lo", "hi"), [(2 * MiB, 256 << 10, 1 * MiB), (1 * MiB, 16 << 10, 64 << 10)])
def test_waited_program_equals_plain_and_waits_in_order(make_artifact, kind, page, lo, hi):
    art, _, x = make_artifact(kind)
    prog, layout, chunks, weight_chunk, host, dev = staged(art, page, lo, hi)
    dev.copy_(host)
    plain = prog.run(x)
    rec = RecordingWaiter()
    waited = prog.run(x, rec)
    assert all(torch.equal(a, b) for a, b in zip(plain, waited)) and len(plain) == len(waited)
    assert rec.calls, "a swapped run must wait at least once"
    assert rec.calls == sorted(rec.calls)  # nondecreasing: chunks land in order
    assert len(set(rec.calls)) == len(rec.calls)  # and no chunk is waited for twice
    read = [w.name for w in art.manifest.weights if w.name != "bn.num_batches_tracked"]  # the one never read
    assert rec.calls[-1] == max(weight_chunk[n] for n in read)
    assert rec.calls[0] < len(chunks) - 1  # compute starts before the last chunk lands
    again = RecordingWaiter()
    prog.run(x, again)
    assert again.calls == rec.calls  # the same waits on every run


@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_every_weight_is_waited_for_before_its_first_use(make_artifact, kind):
    art, _, x = make_artifact(kind, max_batch=4)
    prog, _, chunks, _, host, dev = staged(art, page=1 * MiB, lo=16 << 10, hi=128 << 10)
    dev.copy_(host)
    with torch.no_grad():
        want = prog.run(x)
    dev.fill_(0xFF)  # NaN floats, garbage ints: whatever is read too early shows
    lazy = LazyWaiter(host, dev, chunks)
    with torch.no_grad():
        got = prog.run(x, lazy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert lazy.calls == sorted(lazy.calls) and lazy.calls[0] < len(chunks) - 1
    lazy.finish()
    assert torch.equal(dev, host)


def test_the_fallback_waits_for_every_weight_before_its_module_runs(tmp_path):
    pytest.importorskip("transformers")
    from swapserve.artifact import zoo

    zm = zoo.get("bert-tiny")
    module, x = zm.build(), zm.example()
    build_architecture_artifact(module, x, tmp_path / "b", name="b", architecture=zm.architecture, config=zm.config)
    art = load_artifact(tmp_path / "b")
    prog, _, chunks, _, host, dev = staged(art, page=2 * MiB, lo=64 << 10, hi=256 << 10)
    assert isinstance(prog, ModuleProgram)
    dev.copy_(host)
    with torch.no_grad():
        want = prog.run(x)
        torch.testing.assert_close(want[0], module(*x), rtol=1e-5, atol=1e-5)
    dev.fill_(0xFF)
    lazy = LazyWaiter(host, dev, chunks)
    with torch.no_grad():
        got = prog.run(x, lazy)
    assert torch.equal(got[0], want[0])
    assert lazy.calls == sorted(lazy.calls) and lazy.calls[0] < len(chunks) - 1
    assert prog.activation_bytes(1) is None
