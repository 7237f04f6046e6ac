"""A worker process: the only owner of one device (its CUDA context, page pool and workspaces).

Its main thread reads the commands of :mod:`swapserve.node.messages`; one thread per engine lane runs them and
answers each (always that thread: cuBLAS keeps a handle per thread, and a graph captured on a thread new to a lane's
stream got a cuBLAS workspace allocated into the lane's graph pool — session 23). Lane 0 takes every command except
runs sent to a side lane, in the order they came; side lanes run resident models beside it (a run whose model is no
longer wholly on the device by then moves to lane 0). A side lane's plain runs come on a pipe of its own, which its
thread reads itself (:func:`swapserve.node.workers.direct`); what else is sent to it comes through the main thread.
Model weights come from the node's host store (mapped, never written); request tensors through its IO slab, where
each lane has its own region. It exits when told to, or when the controller's end of the connection closes.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from swapserve.config import EngineConfig
from swapserve.errors import BackendError, PayloadTooLargeError
from swapserve.heap import settle

log = logging.getLogger("swapserve.worker")

EXIT_DEVICE_LOST = 3
"""The worker's exit status when its device failed for good (:meth:`Worker._lost`)."""

STACKS_SIGNAL = signal.SIGUSR1
"""On this signal a worker writes every thread's stack to its standard error (``faulthandler``): the controller
sends it to a worker that did not stop in time, before ending it (:func:`swapserve.node.workers.dump_stacks`)."""


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    device: str
    """``cpu`` or ``cuda:N`` (the physical GPU; the worker sees it as cuda:0)."""
    engine: EngineConfig
    store_root: str
    slab_path: str
    slab_bytes: int
    log_level: int = logging.WARNING
    answers_bytes: int = 0
    """The slab's last part, where the controller has large answers written (:mod:`swapserve.node.answers`)."""
    auto_pool: bool = False
    """Size the weight pool at start: the device's free memory less the workspace and a margin for the
    CUDA context, library workspaces and eager warm-up runs (1 GiB on the CPU)."""


AUTO_POOL_MARGIN = 3 << 30

SWITCH_INTERVAL_S = 1e-4
"""The interpreter's thread switch interval in a GPU worker (default 5 ms). Its lanes run in threads, and each
driver call (a remap's unmap, map and access; a launch; a wait) gives up the GIL and must take it back while
another lane may be running Python: on an H200, remapping 2 pages took 0.19 ms alone and 1.0 ms beside a thread
running Python in 0.8 ms bursts at 5 ms, 0.16 ms at 0.1 ms (``bench/worker_gil.py``); in the node's trace the
remaps of a swap took ~0.7 ms of its first lane's time."""


def worker_main(cfg: WorkerConfig, conn: Connection, lane_conns: tuple[Connection, ...]) -> None:
    """Process entry point (spawned): ``conn`` the controller's connection, ``lane_conns`` the read ends of the
    side lanes' own pipes (lane 1 first)."""
    engine_cfg = cfg.engine
    if cfg.device.startswith("cuda"):
        # Before any CUDA call: this process sees only its own GPU, so its context is the only one there.
        os.environ["CUDA_VISIBLE_DEVICES"] = only_gpu(int(cfg.device.split(":", 1)[1]),
                                                      os.environ.get("CUDA_VISIBLE_DEVICES"))
        engine_cfg = replace(engine_cfg, device="cuda:0")
        import torch

        torch.set_num_threads(1)  # the GPU computes; CPU-side tensor work here is copies (see serve.run)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    if cfg.auto_pool:
        engine_cfg = replace(engine_cfg, pool_bytes=_auto_pool(engine_cfg))
    # The controller stops us (after in-flight work); a signal to the whole process group (Ctrl-C, a service
    # manager) must not kill us first. If the controller dies, our end of the pipe closes and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    logging.basicConfig(level=cfg.log_level, format=f"%(levelname)s worker{cfg.index}: %(message)s")
    try:
        Worker(cfg, engine_cfg, conn, lane_conns).serve()
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    # The process's exit frees its device memory, mappings, page locks and graphs at once. Undoing them model
    # by model (and the interpreter's teardown of as many graphs and buffers) grows with the models: a node of
    # 1500 functions on four GPUs did not stop within a minute. Skip both.
    logging.shutdown()
    os._exit(0)


def only_gpu(index: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker of ``cuda:<index>``, a device numbered as the node sees them: among
    the GPUs its own ``visible`` (``CUDA_VISIBLE_DEVICES``, unset: all) lets it see. A node started with
    ``CUDA_VISIBLE_DEVICES=2,3`` serves on GPUs 2 and 3, not 0 and 1."""
    if visible is None:
        return str(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not 0 <= index < len(entries):
        raise BackendError(f"cuda:{index} is not among the GPUs this node may use (CUDA_VISIBLE_DEVICES={visible!r})")
    return entries[index]


def _value_of(values: dict[str, float]) -> Any:
    """The pool's eviction order from the scheduler's values (then least recently used)."""
    return lambda p: (values.get(p.model, 0.0), p.last_used)


def _auto_pool(cfg: EngineConfig) -> int:
    if cfg.device == "cpu":
        return 1 << 30
    import torch

    free, _total = torch.cuda.mem_get_info(0)
    workspaces = cfg.lanes * cfg.workspace_bytes
    pool = (free - workspaces - AUTO_POOL_MARGIN) // cfg.page_bytes * cfg.page_bytes
    if pool < cfg.page_bytes:
        raise SystemExit(f"{cfg.device}: only {free >> 20} MiB free, not enough for a weight pool beside "
                         f"{cfg.lanes} workspace(s) of {cfg.workspace_bytes >> 20} MiB")
    return pool


class Worker:
    def __init__(self, cfg: WorkerConfig, engine_cfg: EngineConfig, conn: Connection,
                 lane_conns: tuple[Connection, ...]):
        import torch

        from swapserve.engine import HostStore, SwapEngine
        from swapserve.node.messages import Hello, send
        from swapserve.node.slab import Slab

        self.cfg = cfg
        self.conn = conn
        self.store = HostStore(cfg.store_root, 0, align=engine_cfg.align, attach=True)
        self.engine = SwapEngine(engine_cfg, self.store)
        self.slab = Slab(Path(cfg.slab_path), cfg.slab_bytes, create=False)
        self.engine.backend.pin(self.slab.buffer)
        self.torch = torch
        self._sent_version = -1
        self._sent_present: dict[str, float] = {}
        self._queues: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in self.engine.lanes]
        # Placing ahead (``Run.place_ahead``) only for the run right behind the one lane 0 has launched: the
        # receiver, for a run that arrives then with nothing queued before it; lane 0, at the launch, for the
        # run already queued behind (taken from the queue into ``_stash``). Both under ``_ahead_lock``.
        self._ahead_lock = threading.Lock()
        self._launched0 = False
        """Lane 0 has launched its run (its pages pinned) and not yet finished with it."""
        self._stash: list[Any] = []
        """Lane 0's next command, taken from its queue at a launch (:meth:`_launched`)."""
        self._send_lock = threading.Lock()
        self._spin_s = 0.0
        """How long to poll for the next command once a lane has answered (``Run.spin_s``, the latest sent)."""
        self._answered = os.eventfd(0, os.EFD_NONBLOCK)
        """Written when lane 0 has answered while polling is on: wakes the receiver to poll (off the request path)."""
        assert len(lane_conns) == len(self._queues) - 1, "a pipe for each side lane"
        self._lane_conns = lane_conns
        """The side lanes' own pipes (lane 1 first): each read by its lane's thread (:meth:`_next_side`)."""
        self._lane_wake = [os.eventfd(0, os.EFD_NONBLOCK) for _ in self._lane_conns]
        """Written when the receiver has queued something for a side lane: wakes it from its poll."""
        self._lane_polls = []
        for c, w in zip(self._lane_conns, self._lane_wake):
            p = select.poll()
            p.register(w, select.POLLIN)
            p.register(c.fileno(), select.POLLIN)
            self._lane_polls.append(p)
        self._spinner = -1
        """Who polls without sleeping after an answer: the receiver (-1), or the side lane that answered last. One
        thread at a time: two polling threads of one process pass the GIL back and forth, each pass a wake-up."""
        self._busy = [False] * len(self.engine.lanes)
        """Whether each lane is serving a command now (only its own thread writes its entry)."""
        self._values: dict[str, float] = {}
        """Eviction values by model key, as the controller sent them (each run or prefetch carries what changed,
        applied on arrival, in order): every eviction uses the latest."""
        name = torch.cuda.get_device_name(0) if engine_cfg.device.startswith("cuda") else "cpu"
        bw = self._h2d(256 << 20)
        fetch = self._fetch_GBps(64 << 20) if engine_cfg.lanes > 1 else 0.0  # only side lanes fetch
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") if engine_cfg.device.startswith("cuda") else ""
        send(conn, Hello(cfg.device, name, engine_cfg.num_pages * engine_cfg.page_bytes, bw, os.getpid(), fetch, gpu))

    def serve(self) -> None:
        from swapserve.node.messages import PEER_COMMANDS, Prefetch, Run, Stop, recv

        lanes = [threading.Thread(target=self._lane_loop, args=(i,), name=f"swapserve-lane{i}", daemon=True)
                 for i in range(len(self._queues))]
        for t in lanes:
            t.start()
        fd = self.conn.fileno()
        either, commands = select.poll(), select.poll()  # for :meth:`_await_command`
        either.register(fd, select.POLLIN)  # a command,
        either.register(self._answered, select.POLLIN)  # or an answer gone out
        commands.register(fd, select.POLLIN)
        try:
            while True:
                self._await_command(either, commands)
                msg = recv(self.conn)
                received = time.perf_counter()
                if isinstance(msg, Stop):
                    break
                if isinstance(msg, PEER_COMMANDS):
                    self._peer_command(msg, received)
                    continue
                if isinstance(msg, (Run, Prefetch)) and msg.values:
                    self._values.update(msg.values)
                if isinstance(msg, Run):
                    self._spin_s = msg.spin_s
                lane = msg.lane if isinstance(msg, Run) and 0 < msg.lane < len(self._queues) else 0
                if lane == 0:
                    with self._ahead_lock:
                        if self._launched0 and not self._stash and self._queues[0].empty():
                            self._place_ahead(msg)
                        self._queues[0].put((msg, received))
                else:
                    self._put_side(lane, (msg, received))
        finally:
            # Side lanes first: a run they hand back to lane 0 must reach it before lane 0's end.
            for i, t in reversed(list(enumerate(lanes))):
                if i:
                    self._put_side(i, None)
                else:
                    self._queues[0].put(None)
                t.join()
        self._answer(msg, received, None)  # every lane is idle now
        self.engine.backend.synchronize()

    def _await_command(self, either: Any, commands: Any) -> None:
        """Until the controller's next command arrives: asleep, but once an answer has gone out, polling without
        sleeping for ``spin_s`` first (while no lane runs): a command that comes then is read at once, not after
        this thread is woken (tens of µs on the lent VMs: ``bench/overhead.py``'s ``to_worker``)."""
        if not self._spin_s:
            return  # the read that follows waits
        fd = self.conn.fileno()
        while True:
            if any(f == fd for f, _ in either.poll()):
                return
            os.eventfd_read(self._answered)
            hot_until = time.perf_counter() + self._spin_s
            self._spinner = -1
            while not any(self._busy) and self._spinner == -1 and time.perf_counter() < hot_until:
                if commands.poll(0):
                    return

    def _lane_loop(self, lane: int) -> None:
        """Run what comes to this lane, in order, answering each. If answering itself fails (the controller's
        end closed), the process ends, as the controller expects of a worker it cannot reach."""
        try:
            self._serve_lane(lane)
        except BaseException:
            log.exception("lane %d stopped", lane)
            os._exit(1)

    def _serve_lane(self, lane: int) -> None:
        while (item := self._next(lane)) is not None:
            self._busy[lane] = True
            try:
                self._serve(item, lane)
            finally:
                self._busy[lane] = False
                if self._spin_s and not lane:  # a side lane polls its own pipe
                    os.eventfd_write(self._answered, 1)

    def _next(self, lane: int) -> Any:
        """The lane's next command: lane 0's taken at the last launch, if any, else from its queue."""
        if lane:
            return self._next_side(lane)
        with self._ahead_lock:
            if lane == 0 and self._stash:
                return self._stash.pop()
        return self._queues[lane].get()

    def _put_side(self, lane: int, item: Any) -> None:
        self._queues[lane].put(item)
        os.eventfd_write(self._lane_wake[lane - 1], 1)

    def _next_side(self, lane: int) -> Any:
        """A side lane's next command: from its queue (what the receiver passed it), else from its own pipe —
        polled without sleeping for ``spin_s`` after its last answer while no lane runs and no other thread polls
        (:attr:`_spinner`), as the receiver does, else waited for. The end (None, queued by the receiver at a Stop)
        comes after the runs already on the pipe: the controller sent them before the Stop. Its pipe's end (the
        controller gone) leaves the queue, whose end the receiver's exit brings."""
        from swapserve.node.messages import recv

        q, wake, conn, poller = (self._queues[lane], self._lane_wake[lane - 1], self._lane_conns[lane - 1],
                                 self._lane_polls[lane - 1])
        hot_until = time.perf_counter() + self._spin_s if self._spin_s else 0.0
        if hot_until:
            self._spinner = lane
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                pass
            else:
                if item is not None or conn.closed or not any(fd != wake for fd, _ in poller.poll(0)):
                    return item
                q.put(None)  # the end, once the runs sent before it on the lane's pipe are served
            hot = self._spinner == lane and not any(self._busy) and time.perf_counter() < hot_until
            for fd, _ in poller.poll(0 if hot else None):
                if fd == wake:
                    os.eventfd_read(wake)
                    continue
                try:
                    msg = recv(conn)
                except EOFError:
                    poller.unregister(fd)
                    conn.close()
                    continue
                received = time.perf_counter()
                self._spin_s = msg.spin_s
                return msg, received

    def _launched(self) -> None:
        """Lane 0 has launched a run: the run right behind it (queued already, or arriving from now on) may
        have its pages placed while this one executes."""
        with self._ahead_lock:
            self._launched0 = True
            if self._stash:
                return
            try:
                item = self._queues[0].get_nowait()
            except queue.Empty:
                return
            self._stash.append(item)
            if item is not None:
                self._place_ahead(item[0])

    def _serve(self, item: tuple[Any, float], lane: int) -> None:
        from swapserve.errors import NotResidentError

        msg, received = item
        try:
            try:
                result = self.handle(msg, lane)
            finally:
                if lane == 0:  # landed or failed, before it is answered: what arrives after is not placed ahead
                    with self._ahead_lock:
                        self._launched0 = False
        except NotResidentError if lane else ():  # evicted since the scheduler looked: lane 0 swaps it in
            with self._ahead_lock:  # never between the receiver's look at lane 0's queue and its put
                self._queues[0].put(item)
            return
        except BaseException as e:  # noqa: BLE001 - answered below
            self._answer(msg, received, e)
            if self.engine.backend.device_lost():
                self._lost(e)
            return
        self._answer(msg, received, result)

    def _lost(self, error: BaseException) -> None:
        """The device failed for good (a kernel's fault leaves the CUDA context failing every call): leave,
        so that the controller fails what was sent here and starts a worker with a fresh context in its place
        (``NodeConfig.worker_restarts``), rather than every later run on this device failing the same way
        (session 19's trace, one H200)."""
        log.critical("%s is lost (%s: %s); this worker exits", self.cfg.device, type(error).__name__,
                     str(error).splitlines()[0] if str(error) else "")
        logging.shutdown()
        os._exit(EXIT_DEVICE_LOST)

    def _place_ahead(self, msg: Any) -> None:
        """Start placing the pages of lane 0's next command, and copying into them (``SwapEngine.place_ahead``),
        if it is a run that may be (``Run.place_ahead``): not for the on-demand baseline, a peer's copy or a
        fetch."""
        from swapserve.errors import SwapserveError
        from swapserve.node.messages import Run

        if (not isinstance(msg, Run) or not msg.place_ahead or self.engine.mode == "ondemand" or msg.peer >= 0
                or msg.fetch):
            return
        try:
            self.engine.place_ahead(msg.key, _value_of(self._values), msg.id)
        except SwapserveError:  # not on this worker (removed meanwhile): its run says so
            pass

    def _answer(self, msg: Any, received: float, outcome: Any) -> None:
        from swapserve.errors import SwapserveError
        from swapserve.node.messages import Reply, RunResult, send

        if isinstance(outcome, BaseException) and not isinstance(outcome, SwapserveError):
            log.error("command %s failed", type(msg).__name__, exc_info=outcome)
        # Residency is read and sent under one lock: lanes answering at once must not deliver their changes
        # out of order (each is relative to the one sent before).
        with self._send_lock:
            change = self._residency_change()
            if isinstance(outcome, RunResult):
                answered = time.perf_counter()
                outcome.handled_ms = (answered - received) * 1e3
                outcome.received_at, outcome.answered_at = received, answered
            if isinstance(outcome, SwapserveError):
                reply = Reply(msg.id, False, None, change, str(outcome), type(outcome).__name__, outcome.http_status)
            elif isinstance(outcome, BaseException):
                reply = Reply(msg.id, False, None, change, f"{type(outcome).__name__}: {outcome}",
                              type(outcome).__name__, 500)
            else:
                reply = Reply(msg.id, True, outcome, change)
            send(self.conn, reply)

    def handle(self, msg: Any, lane: int = 0) -> Any:
        from swapserve.artifact import load_artifact
        from swapserve.node import messages as m

        if isinstance(msg, m.Run):
            return self._run(msg, lane)
        if isinstance(msg, m.AddModel):
            art = load_artifact(msg.artifact_path)
            if not self.store.has(msg.key):
                self.store.add(msg.key, art, load=False)
            self.engine.add(msg.key, art)
            return settle(log, f"worker {self.cfg.index} ({self.cfg.device})")
        elif isinstance(msg, m.RemoveModel):
            self._values.pop(msg.key, None)
            if msg.key in self.engine.models():
                self.engine.remove(msg.key)
            if self.store.has(msg.key):
                self.store.remove(msg.key)
        elif isinstance(msg, m.Prepare):
            # Capture now, off the request path; then time one resident run at each batch size to seed the
            # scheduler's profile: a batch's time is not the batch-1 time times its size (on an H200 a swapped
            # batch of two DenseNet-201 requests ran 5.9 ms against 5.3 for one, where that estimate said 11.9).
            art = self.engine.artifact(msg.key)
            examples = {b: art.examples(b) for b in msg.batches}
            t0 = time.perf_counter()
            for x in examples.values():
                self.engine.infer(msg.key, x)
            first_ms = (time.perf_counter() - t0) * 1e3
            exec_ms = {}
            for b, x in examples.items():
                t0 = time.perf_counter()
                self.engine.infer(msg.key, x, lane=len(self.engine.lanes) - 1)  # where resident runs mostly go
                exec_ms[b] = (time.perf_counter() - t0) * 1e3
            return m.Prepared(exec_ms, first_ms)
        elif isinstance(msg, m.DropHost):
            if self.store.has(msg.key):
                self.store.spill(msg.key)
        elif isinstance(msg, m.Prefetch):
            t0 = time.perf_counter()
            self.engine.prefetch(msg.key, msg.max_bytes, value=_value_of(self._values))
            run = self.engine.last_run()
            return m.RunResult((), (time.perf_counter() - t0) * 1e3, run.swapped, run.bytes_copied, run.evicted)
        elif isinstance(msg, m.Evict):
            self.engine.evict(msg.key)
        elif isinstance(msg, m.MeasureCopy):
            return self._measure(msg)
        return None

    def _peer_command(self, msg: Any, received: float) -> None:
        """Sharing pages with the other workers (at start) and lending models to them: on the receiving
        thread, so that a peer's run never waits behind this device's own."""
        from swapserve.node import messages as m

        if isinstance(msg, m.ImportPeer):
            m.allow_open_files()
            fds: list[int] = []
            try:
                fds = m.recv_fds(self.conn, msg.count)  # right behind the message in the stream
                outcome: Any = self._import_peer(msg.peer, fds)
            except BaseException as e:  # noqa: BLE001 - answered
                outcome = e
            finally:
                for fd in fds:
                    os.close(fd)
        elif isinstance(msg, m.ExportPages):
            m.allow_open_files()
            try:
                fds = self.engine.backend.export_pages()
            except BaseException as e:  # noqa: BLE001 - answered
                self._answer(msg, received, e)
                return
            try:
                with self._send_lock:  # the descriptors right behind their announcement
                    m.send(self.conn, m.Reply(msg.id, True, m.Exported(len(fds))))
                    m.send_fds(self.conn, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            return
        else:
            try:
                if isinstance(msg, m.Lend):
                    outcome = m.Lent(self.engine.lend(msg.key))
                elif isinstance(msg, m.DropPeer):
                    outcome = self.engine.drop_peer(msg.peer)
                else:
                    outcome = self.engine.unlend(msg.key)
            except BaseException as e:  # noqa: BLE001 - answered
                outcome = e
        self._answer(msg, received, outcome)

    def _import_peer(self, peer: int, fds: list[int]) -> Any:
        """Map a peer's pages; time copying one of them here (GB/s), as a peer-sourced run copies."""
        from swapserve.engine.layout import Chunk
        from swapserve.node.messages import PeerResult

        backend = self.engine.backend
        backend.import_peer(peer, fds)
        page = backend.page_bytes
        dst = self.torch.empty(page, dtype=self.torch.uint8, device=backend.device)
        whole = [Chunk(0, page)]
        with backend.compute():
            return PeerResult(self._best_GBps(page, 5, lambda: backend.fetch_peer(dst.data_ptr(), peer, (0,), whole,
                                                                                    [True])))

    def _run(self, msg: Any, lane: int) -> Any:
        from swapserve.engine import PeerSource
        from swapserve.node.messages import RunResult, TensorRef

        inputs = [self.slab.tensor(r) for r in msg.inputs]
        t0 = time.perf_counter()
        peer = PeerSource(msg.peer, msg.peer_pages) if msg.peer >= 0 else None
        refs: tuple[TensorRef, ...] = ()
        enqueued_ms = 0.0

        def into_slab(outs: list[Any]) -> None:  # on the lane's stream, landing with the run (one wait)
            nonlocal refs, enqueued_ms
            t = time.perf_counter()
            try:
                refs = self.slab.write(outs, msg.out_offset, msg.out_limit, non_blocking=True)
            except PayloadTooLargeError:  # larger than the model declares: into the lane's region instead
                if msg.out_fallback is None:
                    raise
                refs = self.slab.write(outs, *msg.out_fallback, non_blocking=True)
            enqueued_ms = (time.perf_counter() - t) * 1e3

        self.engine.infer(msg.key, inputs, value=_value_of(self._values), lane=lane, fetch=msg.fetch, peer=peer,
                          ticket=msg.id if lane == 0 else None, launched=self._launched if lane == 0 else None,
                          output=into_slab)
        t2 = time.perf_counter()
        run = self.engine.last_run()
        phases = {"wait": run.wait_ms, "upload": run.upload_ms, "place": run.place_ms,
                  "device": run.device_ms - enqueued_ms, "output": enqueued_ms,  # parts of the engine's device_ms
                  "place_lock": run.place_lock_ms, "place_remap": run.place_remap_ms,
                  "place_remap_cpu": run.place_remap_cpu_ms}
        return RunResult(refs, (t2 - t0) * 1e3, run.swapped, run.bytes_copied, run.evicted, phases_ms=phases,
                         lane=lane, from_peer=run.from_peer, placed_ahead=run.placed_ahead, remaps=run.remaps,
                         remap_unmaps=run.remap_unmaps)

    def _residency_change(self) -> Any:
        """What changed in the pool since the last change sent (None if nothing): only the models whose share
        moved, and those it no longer holds — not the whole pool, which holds hundreds of models on a node of
        many functions, with every swap's reply (the controller applies the changes in order)."""
        from swapserve.node.messages import residency_change

        with self.engine.locked():
            pool = self.engine.pool
            if pool.version == self._sent_version:
                return None
            self._sent_version = pool.version
            present = {m: (p := pool.placements[m]).valid_count / p.n_slots for m in pool.holding}
            change = residency_change(self._sent_present, present, pool.num_pages * pool.page_bytes,
                                      (pool.num_pages - pool.free_pages) * pool.page_bytes)
            self._sent_present = present
            return change

    def _h2d(self, nbytes: int, runs: int = 3) -> float:
        """Pinned host→device bandwidth of this device alone (GB/s)."""
        torch = self.torch
        dev = self.engine.backend.device
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
        host.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        return self._best_GBps(nbytes, runs, lambda: dst.copy_(host, non_blocking=True))

    def _fetch_GBps(self, nbytes: int, runs: int = 3) -> float:
        """Host→device bandwidth of a side lane's fetch (``Backend.fetch``) from a registered buffer into
        device memory, alone (GB/s); a model-sized copy (small ones are slower: latency)."""
        from swapserve.engine.layout import Chunk

        backend = self.engine.backend
        host = self.torch.ones(nbytes, dtype=self.torch.uint8)
        backend.pin(host)
        try:
            dst = self.torch.empty(nbytes, dtype=self.torch.uint8, device=backend.device)
            whole = [Chunk(0, nbytes)]
            return self._best_GBps(nbytes, runs, lambda: backend.fetch(dst.data_ptr(), host, whole, [True]))
        finally:
            backend.unpin(host)

    def _best_GBps(self, nbytes: int, runs: int, copy: Any) -> float:
        """The best of ``runs`` timings of ``copy()`` (moving ``nbytes``), device work included (GB/s)."""
        best = 0.0
        for _ in range(runs):
            self.engine.backend.synchronize()
            t = time.perf_counter()
            copy()
            self.engine.backend.synchronize()
            best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
        return best

    def _measure(self, msg: Any) -> Any:
        """Copy bandwidth when started together with the other workers; execution slowdown under a copy."""
        from swapserve.node.messages import CopyResult

        torch = self.torch
        delay = msg.start_at - time.time()
        if delay > 0:
            time.sleep(delay)
        bw = self._h2d(msg.nbytes, runs=2)
        if not msg.exec_probe or self.engine.backend.device.type != "cuda":
            return CopyResult(bw)
        dev = self.engine.backend.device
        a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)

        def kernels() -> float:
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            for _ in range(20):
                a @ a
            torch.cuda.synchronize(dev)
            return (time.perf_counter() - t) * 1e3

        kernels()
        alone = min(kernels() for _ in range(3))
        host = torch.empty(msg.nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(msg.nbytes, dtype=torch.uint8, device=dev)
        side = torch.cuda.Stream(dev)
        copying = []
        for _ in range(3):
            with torch.cuda.stream(side):
                dst.copy_(host, non_blocking=True)
            copying.append(kernels())
        torch.cuda.synchronize(dev)
        return CopyResult(bw, alone, min(copying), slowdown_beside(dev, len(self.engine.lanes)))


def slowdown_beside(dev: Any, lanes: int, rounds: int = 5) -> tuple[float, ...]:
    """How much runs side by side slow each other on CUDA device ``dev``: a batch-1-like graph (a chain of
    256×1024 fp16 matmuls, ~1 ms on an H200, leaving most of the GPU's SMs idle as a small model's kernels
    do) replayed on k streams at once against one alone, for k up to ``lanes``: the time of k together over
    one alone, at index k-2 (k-1 runs beside). ``bench/lanes.py`` sets it beside real models'."""
    import torch

    streams = [torch.cuda.Stream(dev) for _ in range(lanes)]
    graphs = []
    for st in streams:
        x = torch.randn(256, 1024, device=dev, dtype=torch.float16)
        w = torch.randn(1024, 1024, device=dev, dtype=torch.float16) / 32
        with torch.cuda.stream(st):
            for _ in range(3):
                _chain(x, w)
        st.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=st):
            _chain(x, w)
        graphs.append(g)

    def together(k: int) -> float:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for g, st in zip(graphs[:k], streams):
            with torch.cuda.stream(st):
                g.replay()
        torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    together(lanes)
    alone = min(together(1) for _ in range(rounds))
    return tuple(max(1.0, min(together(k) for _ in range(rounds)) / alone) for k in range(2, lanes + 1))


def _chain(x: Any, w: Any, length: int = 200) -> Any:
    """The kernels of :func:`slowdown_beside`."""
    for _ in range(length):
        x = x @ w
    return x
