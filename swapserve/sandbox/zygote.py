"""The zygote: a clean process that has imported torch once and forks a sandbox on request.

Started by :class:`swapserve.sandbox.launcher.ZygoteLauncher` from a fresh interpreter (``python -I``, a
clean environment, no descriptor but its control socket), so what a sandbox inherits from it is the
Python runtime and nothing of the server's: no registry handle, no token, no store mapping. It runs no
tensor work itself (a process that has run OpenMP cannot fork safely).

Control messages are JSON over a SOCK_SEQPACKET socket; a fork request carries the sandbox's three
descriptors (channel, arena, output) as SCM_RIGHTS. The zygote answers ``forked`` with the pid, and
reports ``exit`` with the status once it has reaped a sandbox. It kills only its own, unreaped children,
so a kill can never reach a recycled pid. If the controller goes, the zygote and every sandbox go too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time


def main(fd: int) -> None:
    from swapserve.sandbox import isolation

    isolation.die_with_parent()
    if os.getppid() == 1:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when we stop (Ctrl-C hits the group)
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the point of a zygote: sandboxes start with it imported)

    import swapserve.sandbox.child  # noqa: F401
    import_ms = (time.perf_counter() - t0) * 1e3
    ctrl = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()

    def send(msg: dict[str, object]) -> None:
        try:
            ctrl.send(json.dumps(msg).encode())
        except OSError:
            pass

    send({"op": "ready", "pid": os.getpid(), "import_ms": import_ms})
    try:
        while True:
            try:
                readable, _, _ = select.select([ctrl, wake_r], [], [])
            except InterruptedError:
                continue
            if wake_r in readable:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(children, send)
            if ctrl in readable:
                data, fds, _, _ = socket.recv_fds(ctrl, 65536, 8)
                if not data:
                    break
                msg = json.loads(data)
                if msg.get("op") == "fork" and len(fds) == 3:
                    pid = os.fork()
                    if pid == 0:
                        _become_sandbox(ctrl, wake_r, wake_w, fds)
                    children.add(pid)
                    send({"op": "forked", "id": msg["id"], "pid": pid})
                elif msg.get("op") == "kill" and msg.get("pid") in children:
                    try:
                        os.kill(msg["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for f in fds:
                    os.close(f)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _reap(children: set[int], send: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        send({"op": "exit", "pid": pid, "status": code})  # type: ignore[operator]


def _become_sandbox(ctrl: socket.socket, wake_r: int, wake_w: int, fds: list[int]) -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    ctrl.close()
    os.close(wake_r)
    os.close(wake_w)
    from swapserve.sandbox.child import boot

    boot(*fds)


if __name__ == "__main__":
    main(int(sys.argv[1]))
