"""The wire between the controller and its workers over a real socket pair: messages read without waiting (as the
controller's event loop reads replies), and descriptors (a GPU's pages, one descriptor each, for peer copies) in
batches, with the messages around them intact, whatever the descriptor's blocking mode."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import pytest

from swapserve.node import workers as wk
from swapserve.node.messages import (FD_BATCH, READ_BYTES, Exported, ExportPages, Reply, recv, recv_available,
                                     recv_fds, recv_nowait, send, send_fds)


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    """Both ends of a real socket pair, as the controller and a worker hold them."""
    left, right = mp.Pipe(duplex=True)
    yield left, right
    left.close()
    right.close()


@pytest.fixture
def files() -> Iterator[Callable[[int], list[int]]]:
    """Makes ``n`` open descriptors of distinct (unlinked) files; closes them after the test."""
    made: list[int] = []

    def make(n: int) -> list[int]:
        for _ in range(n):
            fd, path = tempfile.mkstemp()
            os.unlink(path)
            made.append(fd)
        return made[-n:]

    yield make
    for fd in made:
        os.close(fd)


def _same_file(a: int, b: int) -> bool:
    return os.fstat(a).st_ino == os.fstat(b).st_ino


def test_many_descriptors_cross_in_batches_between_messages(pipe, files) -> None:
    left, right = pipe
    fds = files(FD_BATCH * 2 + 17)
    send(left, "before")
    send_fds(left, fds)
    send(left, "after")
    assert recv(right) == "before"
    got = recv_fds(right, len(fds))
    try:
        assert len(got) == len(fds) and all(_same_file(a, b) for a, b in zip(fds, got))
    finally:
        for fd in got:
            os.close(fd)
    assert recv(right) == "after"


def test_a_short_batch_fails_cleanly_and_the_stream_stays_in_step(pipe, files) -> None:
    """Descriptors the kernel dropped (past the receiver's open-file limit) leave a batch short: the receiver
    reads every batch, closes what came and raises; the next message is read as a message."""
    left, right = pipe
    fds = files(FD_BATCH + 3)
    open_before = len(os.listdir("/proc/self/fd"))
    with socket.fromfd(left.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        socket.send_fds(s, [FD_BATCH.to_bytes(2, "little")], fds[:FD_BATCH - 1])  # one missing
        socket.send_fds(s, [(3).to_bytes(2, "little")], fds[FD_BATCH:])
    send(left, "next")
    with pytest.raises(OSError, match=f"received {FD_BATCH + 2} of {FD_BATCH + 3}"):
        recv_fds(right, FD_BATCH + 3)
    assert len(os.listdir("/proc/self/fd")) == open_before  # nothing received was left open
    assert recv(right) == "next"


def test_a_non_blocking_end_waits_for_the_descriptors_and_stays_non_blocking(pipe, files) -> None:
    """An event loop (uvloop) makes the controller's ends non-blocking: the descriptors behind a reply it just read
    may still be on their way."""
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    fds = files(2)
    sender = threading.Thread(target=lambda: (time.sleep(0.2), send_fds(left, fds)))
    sender.start()
    try:
        got = recv_fds(right, 2)
    finally:
        sender.join()
    assert all(_same_file(a, b) for a, b in zip(fds, got))
    assert not os.get_blocking(right.fileno())
    for fd in got:
        os.close(fd)


def test_recv_nowait_reads_whole_messages_in_order_then_says_none(pipe) -> None:
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    assert recv_nowait(right) is None
    big = b"x" * (1 << 20)  # larger than the socket's buffer: it arrives in parts while being read
    sender = threading.Thread(target=lambda: [send(left, m) for m in ("first", big, {"third": 3})])
    sender.start()
    got = []
    while len(got) < 3:
        if (m := recv_nowait(right)) is not None:
            got.append(m)
    sender.join()
    assert got == ["first", big, {"third": 3}]
    assert recv_nowait(right) is None


def test_recv_nowait_leaves_the_descriptors_behind_a_message_to_recv_fds(pipe, files) -> None:
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    fds = files(3)
    send(left, "three follow")
    send_fds(left, fds)
    send(left, "after")
    assert recv_nowait(right) == "three follow"
    got = recv_fds(right, 3)
    try:
        assert all(_same_file(a, b) for a, b in zip(fds, got))
    finally:
        for fd in got:
            os.close(fd)
    assert recv_nowait(right) == "after"


def test_recv_nowait_at_the_other_end_closing(pipe) -> None:
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    send(left, "last")
    left.close()
    assert recv_nowait(right) == "last"
    with pytest.raises(EOFError):
        recv_nowait(right)


def _read_all(conn: Connection, count: int) -> list:
    got: list = []
    while len(got) < count:
        messages, _ = recv_available(conn)
        got += messages
    return got


def test_recv_available_reads_what_has_arrived_in_order_whatever_its_size(pipe) -> None:
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    assert recv_available(right) == ([], False)
    big = b"x" * (3 * READ_BYTES)  # longer than a read, and than the socket's buffer: it comes in parts
    sent = [f"small {i}" for i in range(100)] + [big, {"after": 1}]
    sender = threading.Thread(target=lambda: [send(left, m) for m in sent])
    sender.start()
    try:
        got = _read_all(right, len(sent))
    finally:
        sender.join()
    assert got == sent
    assert recv_available(right) == ([], False)


def test_recv_available_reads_a_message_cut_by_its_read_to_the_end(pipe) -> None:
    """The worker's write may reach the socket in two parts: the read that finds the first waits for the rest."""
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    body = pickle.dumps(("cut", list(range(50))))
    framed = struct.pack("!i", len(body)) + body
    with socket.fromfd(left.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.sendall(framed[:2])  # not even the whole length
        rest = threading.Thread(target=lambda: (time.sleep(0.1), s.sendall(framed[2:])))
        rest.start()
        try:
            assert recv_available(right) == ([("cut", list(range(50)))], False)
        finally:
            rest.join()


def test_recv_available_at_the_other_end_closing(pipe) -> None:
    left, right = pipe
    os.set_blocking(right.fileno(), False)
    send(left, "last")
    left.close()
    assert recv_available(right) == (["last"], False)
    with pytest.raises(EOFError):
        recv_available(right)


def test_the_controller_reads_an_export_s_descriptors_among_replies_that_arrive_at_once(pipe, files) -> None:
    """The controller's reader (``workers.watch``) reads replies many to a read, except while a page export is
    unanswered: its descriptors follow its answer in the stream, and a read past the answer would drop them."""
    left, right = pipe
    fds = files(3)

    async def main() -> None:
        w = wk.WorkerHandle(0, None, None, left, None)  # type: ignore[arg-type]  (only its pipe is used)
        wk.watch(w, on_dead=lambda w: None)
        answered: list[Reply] = []
        w.pending[1] = answered.append
        w.pending[3] = answered.append

        def worker() -> None:  # answers a run, the export with its descriptors and another run, all at once
            msg = recv(right)
            send(right, Reply(1, True, None))
            send(right, Reply(msg.id, True, Exported(len(fds))))
            send_fds(right, fds)
            send(right, Reply(3, True, None))

        thread = threading.Thread(target=worker)
        thread.start()
        try:
            reply = await asyncio.wait_for(wk.call(w, ExportPages(2)), 5)
        finally:
            thread.join()
        try:
            assert reply.ok and len(reply.result.fds) == 3
            assert all(_same_file(a, b) for a, b in zip(fds, reply.result.fds))
        finally:
            for fd in reply.result.fds:
                os.close(fd)
        while len(answered) < 2:
            await asyncio.sleep(0.01)
        assert [r.id for r in answered] == [1, 3] and not w.exporting and not w.dead
        for i in range(10, 110):  # then many to a read again
            w.pending[i] = answered.append
            send(right, Reply(i, True, None))
        while len(answered) < 102:
            await asyncio.sleep(0.01)
        assert [r.id for r in answered[2:]] == list(range(10, 110))
        asyncio.get_running_loop().remove_reader(left.fileno())

    asyncio.run(main())
