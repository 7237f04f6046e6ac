"""The wire between the controller and its workers over a real socket pair: messages read without waiting (as the
controller's event loop reads replies), and descriptors (a GPU's pages, one descriptor each, for peer copies) in
batches, with the messages around them intact, whatever the descriptor's blocking mode."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import pytest

from swapserve.node.messages import FD_BATCH, recv, recv_fds, recv_nowait, send, send_fds


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
