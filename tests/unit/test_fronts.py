"""The fronts' relay: the framed peer protocol (tensors, errors, cancellation, frames cut anywhere), and the
catalog and metrics a FrontService keeps its fronts' RemoteNodes in step with. (Every gateway scenario also runs
through the relay: tests/unit/test_gateway.py's ``relayed`` cases; real front processes: tests/integration.)"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from swapserve.errors import NotFoundError, OverloadedError, UnavailableError
from swapserve.fronts.arena import Arena
from swapserve.fronts.peer import SCRATCH_BYTES, Answer, Peer, Placed, RemoteError, Tensors
from swapserve.fronts.remote import RemoteNode
from swapserve.fronts.service import FrontService
from swapserve.gateway import GatewayConfig
from swapserve.metrics import Metrics
from swapserve.node.api import FunctionState
from tiny_node import TinyNode


class Echo:
    """Answers ``echo`` with its tensors and args; ``fail`` raises what it is told; ``wait`` waits forever."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, Any, Tensors]] = []
        self.cancelled = asyncio.Event()
        self.waiting = asyncio.Event()
        self.lost_peers = 0

    async def call(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> Answer:
        if op == "echo":
            return args, tensors
        if op == "fail":
            raise {"overloaded": OverloadedError("queue full", retry_after=2.5, http_status=429),
                   "missing": NotFoundError("no function 'x'"),
                   "bug": RuntimeError("secret detail")}[args]
        if op == "wait":
            self.waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        raise AssertionError(op)

    def notice(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> None:
        self.notices.append((op, args, tensors))

    def lost(self, peer: Peer) -> None:
        self.lost_peers += 1


async def pair() -> tuple[Peer, Peer, Echo]:
    """Two peers over a real Unix socket pair; the second answers with an Echo."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    echo = Echo()
    _, caller = await loop.create_unix_connection(lambda: Peer(Echo()), sock=a)
    _, callee = await loop.create_unix_connection(lambda: Peer(echo), sock=b)
    return caller, callee, echo


def every_kind_of_tensor() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (6,), generator=g),
        "i32": torch.randint(-100, 100, (3, 1), generator=g, dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(255, dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "large": torch.randn(3 * SCRATCH_BYTES // 4, generator=g),  # larger than the scratch buffer: its own
    }


def test_tensors_of_every_kind_cross_bit_exact() -> None:
    async def main() -> None:
        caller, _, _ = await pair()
        sent = every_kind_of_tensor()
        args = {"id": "r1", "nested": [1, 2.5, None, "x"]}
        value, got = await caller.call("echo", args, sent)
        assert value == args and list(got) == list(sent)
        for name, t in sent.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(got[name], t), name
        # Many calls at once: frames of several calls arrive in one read, and answers come back to each caller.
        calls = [caller.call("echo", i, {"x": torch.full((i % 7,), float(i))}) for i in range(300)]
        for i, (value, got) in enumerate(await asyncio.gather(*calls)):
            assert value == i and torch.equal(got["x"], torch.full((i % 7,), float(i)))

    asyncio.run(main())


class Recorder(asyncio.Transport):
    """A transport that keeps what is written (the frames' bytes, to replay cut up)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += data

    def writelines(self, parts: Any) -> None:
        for p in parts:
            self.write(p)

    def close(self) -> None:
        pass


def test_frames_cut_at_any_point_arrive_whole() -> None:
    async def main() -> None:
        out = Peer(Echo())
        out.connection_made(Recorder())
        sent = every_kind_of_tensor()
        for i in range(20):
            out.notice("n", i, {"t": sent["f32"] * i} if i % 2 else None)
        out.notice("big", None, sent)
        for i in range(20, 40):
            out.notice("n", i)
        for i in range(200):  # mid-sized frames, more of them than the scratch buffer holds: it is reused
            out.notice("mid", i, {"t": torch.full((1000 + i,), float(i))})
        stream = bytes(out.transport.data)  # type: ignore[union-attr]
        rng = random.Random(0)
        for max_cut in (1, 7, 100, 5000, 1 << 20):
            echo = Echo()
            into = Peer(echo)
            into.connection_made(Recorder())
            pos = 0
            while pos < len(stream):
                buf = into.get_buffer(-1)
                n = min(len(buf), rng.randint(1, max_cut), len(stream) - pos)
                buf[:n] = stream[pos:pos + n]
                into.buffer_updated(n)
                pos += n
            assert [a for op, a, _ in echo.notices if op == "n"] == list(range(40)), max_cut
            for op, i, tensors in echo.notices:
                if op == "n" and i % 2 and i < 20:
                    assert torch.equal(tensors["t"], sent["f32"] * i)
            mids = [(i, t["t"]) for op, i, t in echo.notices if op == "mid"]
            assert [i for i, _ in mids] == list(range(200))
            assert all(torch.equal(t, torch.full((1000 + i,), float(i))) for i, t in mids)
            (big,) = [t for op, _, t in echo.notices if op == "big"]
            assert all(torch.equal(big[k], v) for k, v in sent.items())

    asyncio.run(main())


def test_errors_cross_with_their_status_and_retry_after(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        caller, _, _ = await pair()
        with pytest.raises(OverloadedError) as over:
            await caller.call("fail", "overloaded")
        assert over.value.http_status == 429 and over.value.retry_after == 2.5 and "queue full" in str(over.value)
        with pytest.raises(RemoteError) as missing:
            await caller.call("fail", "missing")
        assert missing.value.http_status == 404 and str(missing.value) == "no function 'x'"
        with caplog.at_level(logging.ERROR, "swapserve.fronts.peer"):
            with pytest.raises(RemoteError) as bug:
                await caller.call("fail", "bug")
        assert bug.value.http_status == 500 and "secret" not in str(bug.value) and "incident" in str(bug.value)
        assert "secret detail" in caplog.text  # logged where it happened, with the incident named
        assert str(bug.value).split("incident ")[1][:12] in caplog.text

    asyncio.run(main())


def test_a_call_given_up_is_cancelled_on_the_other_side_and_a_closed_connection_fails_calls() -> None:
    async def main() -> None:
        caller, callee, echo = await pair()
        task = asyncio.ensure_future(caller.call("wait"))
        await echo.waiting.wait()
        task.cancel()
        await asyncio.wait_for(echo.cancelled.wait(), 5)
        echo.waiting.clear()
        echo.cancelled.clear()
        pending = asyncio.ensure_future(caller.call("wait"))
        await echo.waiting.wait()
        callee.close()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(pending, 5)
        await asyncio.wait_for(echo.cancelled.wait(), 5)  # the callee's work stopped with the connection
        assert echo.lost_peers == 1
        with pytest.raises(UnavailableError):
            await caller.call("echo")

    asyncio.run(main())


async def relay(node: TinyNode, metrics: Metrics, fronts: int = 2) -> tuple[FrontService, list[RemoteNode]]:
    service = FrontService(node, metrics, "127.0.0.1", 0, 0, GatewayConfig())
    await service.listen()
    remotes = []
    for i in range(fronts):
        r = RemoteNode()
        await r.connect(str(service.socket_path), i, 0)
        remotes.append(r)
    return service, remotes


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not check():
        assert loop.time() < end, "not within the timeout"
        await asyncio.sleep(0.001)


def test_every_front_follows_the_catalog() -> None:
    async def main() -> None:
        node = TinyNode()
        service, (a, b) = await relay(node, Metrics())
        try:
            assert {i.spec.name for i in a.list_functions()} == set(node.functions)
            assert a.get_function("mixed").spec == node.get_function("mixed").spec  # the whole spec crosses
            assert a.is_ready() and a.is_live()
            info = await a.unload("linear")
            assert info.state is FunctionState.UNAVAILABLE
            # The caller's catalog changed before its answer came (same connection, pushed first) ...
            assert a.get_function("linear").state is FunctionState.UNAVAILABLE
            # ... and every other front's follows.
            await eventually(lambda: b.get_function("linear").state is FunctionState.UNAVAILABLE)
            await b.delete("mixed")
            with pytest.raises(NotFoundError):
                b.get_function("mixed")
            await eventually(lambda: "mixed" not in {i.spec.name for i in a.list_functions()})
            node.ready = False  # a change the node makes itself
            await eventually(lambda: not a.is_ready() and not b.is_ready())
            node.ready = True
            await eventually(lambda: a.is_ready() and b.is_ready())
            service.drain()
            await eventually(lambda: not a.is_ready() and a.drain.is_set() and b.drain.is_set())
            assert a.is_live()
        finally:
            await service.close()
        await eventually(lambda: not b.is_live())  # the controller is gone

    asyncio.run(main())


def test_a_scrape_counts_what_every_front_observed() -> None:
    async def main() -> None:
        node = TinyNode()
        metrics = Metrics()
        service, (a, b) = await relay(node, metrics)
        try:
            a.metrics.observe_http("/v2/models/{name}/infer", "POST", 200, 0.01)
            for _ in range(3):
                b.metrics.observe_http("/v2/models/{name}/infer", "POST", 200, 0.01)
                b.metrics.observe_request("linear", 200, 0.01)
            b.metrics.observe_request("never-deployed", 200, 0.01)
            b.metrics.observe_loop_lag(0.003)
            text = (await a.metrics.render_async(["swapserve_http_requests", "swapserve_requests",
                                                  "swapserve_front_event_loop_lag_seconds"])).decode()
        finally:
            await service.close()
        assert 'swapserve_http_requests_total{route="/v2/models/{name}/infer",method="POST",code="200"} 4.0' in text
        assert 'swapserve_requests_total{function="linear",code="200"} 3.0' in text
        assert "never-deployed" not in text  # a function not in the node never becomes a label
        assert "swapserve_front_event_loop_lag_seconds_count 1.0" in text

    asyncio.run(main())


def test_the_arena_allocates_first_fit_and_merges_what_is_freed(tmp_path: Path) -> None:
    arena = Arena(1024, tmp_path)
    try:
        a, b, c = arena.alloc(100), arena.alloc(64), arena.alloc(200)
        assert (a, b, c) == (0, 128, 192)  # 64-byte aligned sizes
        assert arena.alloc(1024) is None  # no range that large
        arena.free(b)
        assert arena.alloc(65) == 448 and arena.alloc(64) == 128  # first fit: b's hole takes 64, not 65
        arena.free(128)
        arena.free(a)
        arena.free(c)
        arena.free(448)
        assert arena.used_bytes == 0 and arena.alloc(1024) == 0  # every hole merged back into one range
        with pytest.raises(KeyError):
            arena.free(512)  # never allocated
    finally:
        arena.close()
    assert not list(tmp_path.iterdir())


def test_large_answers_come_through_shared_memory_and_their_space_comes_back() -> None:
    async def main() -> None:
        node = TinyNode()
        service, (front,) = await relay(node, Metrics(), fronts=1)
        try:
            (arena,) = service._arenas.values()
            await eventually(lambda: not arena.path.exists())  # unlinked once the front mapped it
            x = torch.randn(3, 4)
            result = await front.infer("wide", {"x": x})
            want = node.functions["wide"][1]({"x": x})
            assert torch.equal(result.outputs["big"], want["big"]) and torch.equal(result.outputs["small"], want["small"])
            assert arena.used_bytes >= want["big"].nbytes  # "big" lies in the arena while the front holds it
            del result
            await eventually(lambda: arena.used_bytes == 0)  # the front let go: a notice gave the space back
            # A full arena: the answer comes inline, as right.
            hog = arena.alloc(arena.nbytes - 4096)
            result = await front.infer("wide", {"x": x})
            assert torch.equal(result.outputs["big"], want["big"])
            arena.free(hog)
        finally:
            await service.close()

    asyncio.run(main())


def test_large_inputs_go_through_the_fronts_arena_and_come_back_when_the_controller_lets_go() -> None:
    async def main() -> None:
        node = TinyNode()
        service, (front,) = await relay(node, Metrics(), fronts=1)
        try:
            assert front.inputs is not None
            await eventually(lambda: not front.inputs.path.exists())  # unlinked once the controller mapped it
            x = torch.randn(2, 65536)
            sent = front._place({"x": x, "small": torch.ones(3)})
            assert isinstance(sent["x"], Placed) and torch.equal(sent["x"].tensor, x)  # by reference
            assert isinstance(sent["small"], torch.Tensor)  # small ones inline
            front.inputs.free(sent["x"].offset)
            result = await front.infer("rowsum", {"x": x})
            assert torch.equal(result.outputs["y"], x.sum(dim=1))
            await eventually(lambda: front.inputs.used_bytes == 0)  # the controller let go: a notice freed it
            # A call that fails, and one given up while the controller holds its inputs: theirs come back too.
            with pytest.raises(RemoteError, match="no function"):
                await front.infer("nosuch", {"x": x})
            await eventually(lambda: front.inputs.used_bytes == 0)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(front.infer("hang", {"x": x}), 0.2)
            await eventually(lambda: front.inputs.used_bytes == 0)
            # A full arena: inputs go inline, as small ones do.
            hog = front.inputs.alloc(front.inputs.nbytes - 4096)
            result = await front.infer("rowsum", {"x": x})
            assert torch.equal(result.outputs["y"], x.sum(dim=1))
            front.inputs.free(hog)
        finally:
            await service.close()

    asyncio.run(main())


def test_an_answer_that_cannot_be_sent_fails_the_call_instead_of_hanging() -> None:
    class Complex(Echo):
        async def call(self, peer: Peer, op: str, args: Any, tensors: Tensors) -> Answer:
            return None, {"z": torch.zeros(2, dtype=torch.complex64)}  # no dtype of the wire

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _, caller = await loop.create_unix_connection(lambda: Peer(Echo()), sock=a)
        await loop.create_unix_connection(lambda: Peer(Complex()), sock=b)
        with pytest.raises(RemoteError) as e:
            await asyncio.wait_for(caller.call("anything"), 5)
        assert e.value.http_status == 400 and "complex64" in str(e.value)

    asyncio.run(main())
