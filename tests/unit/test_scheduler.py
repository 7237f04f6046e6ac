"""The scheduler core with a fake clock: states built by hand, times passed in as floats."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace

import pytest

from swapserve.scheduler import (
    Decision, DeviceState, Dispatch, FunctionQueue, LinkProfile, ModelProfile, NodeState, Queued, Request, Scheduler,
    SideLane, View, rate_at, rate_since, update_rate,
)
from swapserve.scheduler.estimate import LATE_GRACE_S

GB = 10**9
MB = 10**6
T0 = 1000.0  # the fake clock's "now"; any value works, a non-zero one catches code that assumes 0
# Tests of where and how long whole runs go pass swap_piece_ms=0: their long copies would otherwise come in
# pieces (tested on their own below).


def node(n: int = 2, link: LinkProfile | None = None, pool: int = 80 * GB, max_queued: int = 4096) -> NodeState:
    return NodeState(devices=[DeviceState(i, pool) for i in range(n)], queues={}, profiles={},
                     link=link or LinkProfile(h2d_GBps=(50.0,)), max_queued=max_queued)


def fn(state: NodeState, name: str, nbytes: int = 1 * GB, exec_ms: dict[int, float] | None = None,
       slo_ms: float = 100.0, max_batch: int = 4, max_queue: int = 64, late: str = "refuse",
       overhead_ms: float = 0.3) -> FunctionQueue:
    state.profiles[name] = ModelProfile(nbytes, dict(exec_ms or {1: 1.0}), overhead_ms)
    fq = FunctionQueue(name, slo_ms, max_batch, max_queue, late)  # type: ignore[arg-type]
    state.queues[name] = fq
    return fq


def req(state: NodeState, name: str, rid: str, at: float = T0, items: int = 1) -> Request:
    return Request(rid, name, at, at + state.queues[name].slo_ms / 1000.0, items)


def enqueue(state: NodeState, name: str, rid: str, at: float = T0, items: int = 1) -> Request:
    """Put a request in the queue by hand (no admission), keeping deadline order."""
    r = req(state, name, rid, at, items)
    state.queues[name].requests.append(r)
    state.mark_waiting(name)
    state.queues[name].requests.sort(key=lambda x: x.deadline)
    return r


def busy(state: NodeState, device: int, until: float, running: str = "other", copying_until: float | None = None) -> None:
    d = state.devices[device]
    d.busy_until, d.running, d.copying_until = until, running, copying_until


def only(decision):
    assert len(decision.dispatches) == 1, decision
    return decision.dispatches[0]


# --- placement ---------------------------------------------------------------------------------------

def test_resident_idle_device_preferred():
    s = node(3)
    fn(s, "f", exec_ms={1: 2.0})
    s.devices[1].resident.add("f")
    enqueue(s, "f", "r1")
    d = only(Scheduler().decide(s, T0))
    assert (d.device, d.source, d.request_ids, d.copy_ms) == (1, "resident", ("r1",), 0.0)
    assert d.expected_ms == pytest.approx(2.0)


@pytest.mark.parametrize("policy", ["swapserve", "fifo_lru"])
def test_a_device_out_of_service_gets_nothing_and_lends_nothing(policy):
    """Device 1's worker died: though the scheduler last saw f there (resident, side lanes free, first lane
    idle), nothing goes there and nothing is copied from there; device 0 serves, from host. With every
    device out, queued requests are refused saying so."""
    s = node(2, LinkProfile(h2d_GBps=(50.0,), d2d_GBps=300.0))
    for d in s.devices:
        d.side = [SideLane()]
    fn(s, "f", nbytes=1 * GB, exec_ms={1: 1.0})
    s.devices[1].resident.add("f")
    s.devices[1].side[0] = SideLane(until=T0 - 1.0, running="f", fetching=True)  # f was on its way in there too
    s.devices[1].out = True
    assert not s.devices[1].idle
    assert not View(s, T0, peers=True).holds("f", 1, T0)
    sched = Scheduler(policy, swap_piece_ms=0, peer_copies=True)  # type: ignore[arg-type]
    for i in range(3):
        enqueue(s, "f", f"r{i}")
    decision = sched.decide(s, T0)
    assert decision.dispatches and {(d.device, d.source) for d in decision.dispatches} <= {(0, "host"),
                                                                                           (0, "resident")}
    fn(s, "g", nbytes=1 * GB)
    s.devices[1].resident.add("g")
    p = Scheduler(swap_piece_ms=0).prefetch(s, "g", T0)  # stale there: prefetched onto device 0
    assert p is not None and p.device == 0
    busy(s, 0, T0 + 1.0)
    assert Scheduler(swap_piece_ms=0).prefetch(s, "g", T0) is None  # the only device not busy is out
    s.devices[0].busy_until = s.devices[0].running = None
    s.devices[0].out = True
    if policy == "swapserve":
        rejects = sched.decide(s, T0).rejects
        assert rejects and all("no device is in service" in r.reason for r in rejects)
    else:
        assert not sched.decide(s, T0).dispatches


def _full_pools(s: NodeState, rates: tuple[float, float]) -> None:
    """Each device's pool full of 1 GB models, called ``rates[d]`` times a second (recently)."""
    for d, rate in enumerate(rates):
        for i in range(s.devices[d].pool_bytes // GB):
            name = f"m{d}{i}"
            fq = fn(s, name, exec_ms={1: 1.0})
            fq.rate, fq.last_arrival = rate, T0 - 1
            s.devices[d].resident.add(name)
            s.devices[d].last_used[name] = T0 - 1
        s.devices[d].used_bytes = s.devices[d].pool_bytes


@pytest.mark.parametrize("cold", [0, 1])
def test_a_swap_between_alike_idle_devices_goes_where_eviction_costs_least(cold):
    """Two idle devices that would finish the swap alike: it goes to the one whose pool holds models called
    less (its next eviction gives up less), not to the lowest index — which sent the first of two H200s 2.5
    times the second's swaps at N = 800."""
    s = node(2, pool=4 * GB)
    _full_pools(s, (0.1, 5.0) if cold == 0 else (5.0, 0.1))
    fn(s, "f", exec_ms={1: 1.0})
    enqueue(s, "f", "r1")
    d = only(Scheduler(swap_piece_ms=0).decide(s, T0))
    assert (d.device, d.source) == (cold, "host")
    assert set(d.values) == {f"m{cold}{i}" for i in range(4)}  # the worker evicts among the cold pool's models


def test_an_empty_pool_wins_a_tie_and_the_lower_index_a_tie_of_values():
    s = node(3, pool=4 * GB)
    _full_pools(s, (0.1, 0.1))
    fn(s, "f", exec_ms={1: 1.0})
    enqueue(s, "f", "r1")
    assert only(Scheduler(swap_piece_ms=0).decide(s, T0)).device == 2  # an empty pool gives up nothing
    s.devices[2].out = True
    assert only(Scheduler(swap_piece_ms=0).decide(s, T0)).device == 0  # alike: the lowest index


def test_free_room_wins_a_tie_over_evicting_however_cold_the_victim():
    s = node(2, pool=4 * GB)
    _full_pools(s, (0.1, 5.0))
    s.devices[1].resident -= {"m12", "m13"}
    s.devices[1].used_bytes = 2 * GB  # room for the 1 GB model beside its hot ones
    fn(s, "f", exec_ms={1: 1.0})
    enqueue(s, "f", "r1")
    assert only(Scheduler(swap_piece_ms=0).decide(s, T0)).device == 1


def test_partial_residency_copies_only_missing_bytes():
    s = node(2)
    fn(s, "f", nbytes=1 * GB)
    s.devices[1].partial["f"] = 0.75
    enqueue(s, "f", "r1")
    d = only(Scheduler().decide(s, T0))
    assert (d.device, d.source) == (1, "partial")
    assert d.copy_ms == pytest.approx(250 * MB / (50 * 1e6))  # 5 ms, not 20


@pytest.mark.parametrize("d2d, on", [(300.0, True), (300.0, False), (None, True)])
def test_peer_copy_preferred_over_host_when_nvlink(d2d, on):
    """A copy-bound model (20 ms from host, 1 ms of compute) that a busy device holds: from that device over
    NVLink where peer copies are on and the link was measured, else from host."""
    s = node(2, LinkProfile(h2d_GBps=(50.0,), d2d_GBps=d2d))
    fn(s, "f", nbytes=1 * GB, exec_ms={1: 1.0})
    s.devices[0].resident.add("f")
    busy(s, 0, T0 + 10.0)
    enqueue(s, "f", "r1")
    d = only(Scheduler(swap_piece_ms=0, peer_copies=on).decide(s, T0))
    assert d.device == 1
    if d2d and on:
        assert (d.source, d.peer) == ("peer", 0)
        assert d.copy_ms == pytest.approx(1e9 / 300e6)
        assert d.expected_ms == pytest.approx(1e9 / 300e6 + 1.0 + 0.3)  # the bytes, then the run
    else:
        assert (d.source, d.peer) == ("host", None)
        assert d.expected_ms == pytest.approx(20.0 + 0.3)


def test_a_peer_copy_only_where_it_beats_the_pipelined_copy_from_host():
    """Compute-bound (30 ms of compute hide a 20 ms copy from host): a peer's copy, then the run, would end
    later than the host copy pipelined with the run."""
    s = node(2, LinkProfile(h2d_GBps=(50.0,), d2d_GBps=300.0))
    fn(s, "f", nbytes=1 * GB, exec_ms={1: 30.0}, slo_ms=1000.0)
    s.devices[0].resident.add("f")
    busy(s, 0, T0 + 10.0)
    enqueue(s, "f", "r1")
    d = only(Scheduler(swap_piece_ms=0, peer_copies=True).decide(s, T0))
    assert (d.device, d.source, d.peer) == (1, "host", None)


def test_host_copy_goes_to_least_contended_link():
    link = LinkProfile(h2d_GBps=(50.0, 25.0), h2d_link=(0, 0, 1, 1))
    s = node(4, link)
    fn(s, "f", nbytes=500 * MB)
    busy(s, 0, T0 + 1.0, copying_until=T0 + 1.0)  # device 0 copies over link 0 for the next second
    enqueue(s, "f", "r1")
    d = only(Scheduler(swap_piece_ms=0).decide(s, T0))
    assert (d.device, d.source) == (2, "host")  # device 1 would share link 0 with device 0
    assert d.copy_ms == pytest.approx(10.0)


def test_host_contention_counted_only_while_the_other_copy_lasts():
    s = node(2, LinkProfile(h2d_GBps=(50.0, 25.0)))  # one shared link
    fn(s, "f", nbytes=500 * MB)
    enqueue(s, "f", "r1")
    busy(s, 0, T0 + 1.0, copying_until=T0 + 1.0)
    assert only(Scheduler(swap_piece_ms=0).decide(s, T0)).copy_ms == pytest.approx(20.0)  # contended throughout
    busy(s, 0, T0 + 1.0, copying_until=T0 + 0.002)
    # 2 ms at 25 GB/s (50 MB), then the other 450 MB alone at 50 GB/s (9 ms).
    assert only(Scheduler(swap_piece_ms=0).decide(s, T0)).copy_ms == pytest.approx(11.0)


def test_second_host_copy_in_one_decision_sees_the_first():
    s = node(2, LinkProfile(h2d_GBps=(50.0, 25.0)))
    fn(s, "f", nbytes=500 * MB)
    fn(s, "g", nbytes=500 * MB)
    enqueue(s, "f", "rf")
    enqueue(s, "g", "rg", at=T0 + 0.001)
    a, b = Scheduler(swap_piece_ms=0).decide(s, T0).dispatches
    assert (a.function, a.device, a.copy_ms) == ("f", 0, pytest.approx(10.0))
    # g shares the link while f's copy lasts (10 ms: 250 MB at 25 GB/s), then has it alone (250 MB: 5 ms).
    assert (b.function, b.device, b.copy_ms) == ("g", 1, pytest.approx(15.0))


def test_affinity_waits_for_a_soon_free_resident_device():
    s = node(2)
    fn(s, "f", nbytes=1 * GB, exec_ms={1: 1.0}, slo_ms=50)  # host swap 20 ms
    fn(s, "g", nbytes=1 * GB, exec_ms={1: 1.0}, slo_ms=100)
    s.devices[1].resident.add("f")
    s.devices[0].resident.add("g")
    busy(s, 1, T0 + 0.002)
    enqueue(s, "f", "rf")  # earlier deadline: considered first
    enqueue(s, "g", "rg")
    d = only(Scheduler().decide(s, T0))
    assert (d.function, d.device) == ("g", 0)  # f waits for device 1 (3 ms) rather than a 20 ms swap
    assert s.queues["f"].requests  # decide does not touch state

    busy(s, 1, T0 + 0.5)  # device 1 frees too late: now the swap is worth it
    s.queues["g"].requests.clear()
    d = only(Scheduler().decide(s, T0))
    assert (d.function, d.device, d.source) == ("f", 0, "host")


def test_link_contention_can_make_waiting_better_than_swapping():
    # f: 500 MB (10 ms alone, 20 ms shared), resident on device 1 which frees in 15 ms.
    def state(other_copy: bool) -> NodeState:
        s = node(3, LinkProfile(h2d_GBps=(50.0, 25.0)))
        fn(s, "f", nbytes=500 * MB, exec_ms={1: 1.0})
        s.devices[1].resident.add("f")
        busy(s, 1, T0 + 0.015)
        busy(s, 2, T0 + 1.0, copying_until=T0 + 1.0 if other_copy else None)
        enqueue(s, "f", "r1")
        return s

    assert only(Scheduler().decide(state(False), T0)).device == 0  # 10.3 ms < 16 ms
    assert Scheduler().decide(state(True), T0).dispatches == ()  # 20.3 ms > 16 ms: wait for device 1


def test_model_too_big_for_a_device_goes_elsewhere():
    s = node(2)
    s.devices[0].pool_bytes = 1 * GB
    fn(s, "f", nbytes=2 * GB)
    enqueue(s, "f", "r1")
    assert only(Scheduler().decide(s, T0)).device == 1


# --- ordering and batching ---------------------------------------------------------------------------

def test_edf_across_functions():
    s = node(1)
    fn(s, "f", slo_ms=200)
    fn(s, "g", slo_ms=50)
    s.devices[0].resident |= {"f", "g"}
    sch = Scheduler()
    assert sch.admit(s, req(s, "f", "rf", T0), T0) is None
    assert sch.admit(s, req(s, "g", "rg", T0 + 0.001), T0 + 0.001) is None  # later, but due sooner
    assert only(sch.decide(s, T0 + 0.001)).request_ids == ("rg",)


def test_batches_up_to_max_batch_in_deadline_order_respecting_items():
    s = node(1)
    fn(s, "f", max_batch=4, exec_ms={1: 1.0, 4: 2.5})
    s.devices[0].resident.add("f")
    for i, items in enumerate([1, 2, 2, 1]):
        enqueue(s, "f", f"r{i}", at=T0 + i * 0.001, items=items)
    d = only(Scheduler().decide(s, T0 + 0.01))
    assert d.request_ids == ("r0", "r1")  # 1+2 items; r2's 2 would make 5 > 4 and r3 may not overtake it
    assert d.expected_ms == pytest.approx(1.0 + (3 - 1) / 3 * 1.5)  # exec_at(3), interpolated

    s.queues["f"].requests.clear()
    for i in range(6):
        enqueue(s, "f", f"q{i}", at=T0 + (5 - i) * 0.001)  # inserted out of order
    d = only(Scheduler().decide(s, T0 + 0.01))
    assert d.request_ids == ("q5", "q4", "q3", "q2")
    assert d.expected_ms == pytest.approx(2.5)


def test_hot_function_spreads_only_beyond_one_batch():
    s = node(2)
    fn(s, "f", max_batch=4)
    s.devices[0].resident.add("f")
    s.devices[1].resident.add("f")
    for i in range(6):
        enqueue(s, "f", f"r{i}", at=T0 + i * 0.001)
    a, b = Scheduler().decide(s, T0 + 0.01).dispatches
    assert (a.device, a.request_ids) == (0, ("r0", "r1", "r2", "r3"))
    assert (b.device, b.request_ids) == (1, ("r4", "r5"))

    del s.queues["f"].requests[4:]  # one batch: one device
    assert only(Scheduler().decide(s, T0 + 0.01)).request_ids == ("r0", "r1", "r2", "r3")


def test_function_running_elsewhere_gets_no_second_copy_for_one_batch():
    s = node(2)
    fn(s, "f", nbytes=100 * MB, max_batch=4)  # a 2 ms swap onto device 0 would finish first
    s.devices[1].resident.add("f")
    busy(s, 1, T0 + 0.010, running="f")
    enqueue(s, "f", "r1")
    assert Scheduler().decide(s, T0).dispatches == ()  # waits for device 1
    for i in range(2, 6):
        enqueue(s, "f", f"r{i}")
    d = only(Scheduler().decide(s, T0))  # more than a batch queued: spread
    assert (d.device, d.source, len(d.request_ids)) == (0, "host", 4)
    s.devices[0].resident.add("f")  # one batch again, but device 0 already holds it: no copy needed
    del s.queues["f"].requests[1:]
    assert only(Scheduler().decide(s, T0)).device == 0


def test_decide_is_pure_and_deterministic():
    s = node(3, LinkProfile(h2d_GBps=(50.0, 25.0), d2d_GBps=300.0))
    for k, name in enumerate("abcde"):
        fn(s, name, nbytes=(k + 1) * 200 * MB, max_batch=2)
        for i in range(3):
            enqueue(s, name, f"{name}{i}", at=T0 + 0.001 * i)
    s.devices[1].resident.add("c")
    before = copy.deepcopy(s)
    first = Scheduler().decide(s, T0 + 0.005)
    assert s == before
    assert Scheduler().decide(s, T0 + 0.005) == first
    assert len(first.dispatches) == 3
    assert {d.device for d in first.dispatches} == {0, 1, 2}


# --- admission ---------------------------------------------------------------------------------------

def test_429_when_function_queue_full_and_state_unchanged():
    s = node(1)
    fn(s, "f", max_queue=2, late="serve")
    sch = Scheduler()
    assert sch.admit(s, req(s, "f", "a"), T0) is None
    assert sch.admit(s, req(s, "f", "b"), T0) is None
    before = copy.deepcopy(s)
    r = sch.admit(s, req(s, "f", "c"), T0)
    assert r is not None and (r.request_id, r.status) == ("c", 429) and r.retry_after >= 1
    assert s == before


def test_503_when_node_full_and_state_unchanged():
    s = node(1, max_queued=3)
    fn(s, "f", late="serve")
    fn(s, "g", late="serve")
    sch = Scheduler()
    for rid in "abc":
        assert sch.admit(s, req(s, "f", rid), T0) is None
    before = copy.deepcopy(s)
    r = sch.admit(s, req(s, "g", "d"), T0)
    assert r is not None and r.status == 503 and r.retry_after >= 1
    assert s == before


@pytest.mark.parametrize("late", ["refuse", "serve"])
def test_early_503_when_deadline_cannot_be_met(late):
    s = node(1)
    fn(s, "f", slo_ms=100, late=late)
    s.devices[0].resident.add("f")
    busy(s, 0, T0 + 5.0)  # the only device is busy for 5 s
    before = copy.deepcopy(s)
    r = Scheduler().admit(s, req(s, "f", "r1"), T0)
    if late == "refuse":
        assert r is not None and r.status == 503
        assert r.retry_after == 5.0  # finishes at +5.001 s, due at +0.1 s: 4.9 s late, rounded up
        assert s == before
    else:
        assert r is None
        assert [x.id for x in s.queues["f"].requests] == ["r1"]


def test_admission_counts_the_work_queued_ahead():
    def state(backlog: bool) -> NodeState:
        s = node(1)
        fn(s, "f", slo_ms=100)
        fn(s, "g", slo_ms=100, max_batch=1, exec_ms={1: 20.0})
        s.devices[0].resident |= {"f", "g"}
        if backlog:  # 200 ms of g due before the new request
            for i in range(10):
                enqueue(s, "g", f"g{i}", at=T0 - 0.05)
        return s

    assert Scheduler().admit(state(False), req(state(False), "f", "r"), T0) is None
    s = state(True)
    r = Scheduler().admit(s, req(s, "f", "r"), T0)
    assert r is not None and r.status == 503 and r.retry_after >= 1

    s = state(False)  # the same backlog in the function's own queue
    for i in range(10):
        enqueue(s, "g", f"g{i}", at=T0 - 0.05)
    assert Scheduler().admit(s, req(s, "g", "r"), T0).status == 503
    s.queues["g"].requests.clear()
    assert Scheduler().admit(s, req(s, "g", "r"), T0) is None


def test_cold_model_with_tight_slo_is_served_not_refused_forever():
    s = node(1)
    fn(s, "f", nbytes=1 * GB, slo_ms=10)  # a cold swap takes 20 ms > SLO; a resident run 1 ms
    assert Scheduler().admit(s, req(s, "f", "r1"), T0) is None
    d = only(Scheduler().decide(s, T0))  # not dropped as hopeless: its lateness is only its cold start
    assert d.source == "host"
    # But waiting is not forgiven: with the device busy for a second it is refused.
    s = node(1)
    fn(s, "f", nbytes=1 * GB, slo_ms=10)
    busy(s, 0, T0 + 1.0)
    assert Scheduler().admit(s, req(s, "f", "r1"), T0).status == 503


def test_the_grace_left_out_where_a_finish_meets_its_deadline_changes_no_verdict():
    """Admission and triage count a request's cold-start grace only where its finish misses its deadline
    without one (the grace is never negative): on random states, with cold, partly resident and resident
    models, busy lanes and long queues, every verdict and Retry-After is the one the grace counted always gives,
    and where admission counts a grace it is the whole grace."""
    import random

    rng = random.Random(5)
    checked, graced, skipped, dropped = 0, 0, 0, 0
    for _ in range(60):
        s = lanes(node(rng.choice((1, 2, 3)), LinkProfile(h2d_GBps=(50.0, 30.0), fetch_GBps=20.0)),
                  rng.choice((0, 1, 2)))
        names = [f"f{i}" for i in range(5)]
        for name in names:
            fn(s, name, nbytes=rng.choice((40 * MB, 400 * MB, 2 * GB)), exec_ms={1: rng.uniform(0.5, 4.0)},
               slo_ms=rng.choice((5.0, 20.0, 60.0)), max_batch=rng.choice((1, 4)))
        for d in s.devices:
            for name in rng.sample(names, 2):
                if rng.random() < 0.5:
                    d.resident.add(name)
                else:
                    d.partial[name] = rng.random()
            if rng.random() < 0.5:
                busy(s, d.index, T0 + rng.uniform(-0.005, 0.03), running=rng.choice(names))
            for ln in d.side:
                if rng.random() < 0.5:
                    ln.until, ln.running = T0 + rng.uniform(0.0, 0.02), rng.choice(names)
        for i in range(rng.randrange(8)):  # queued work, some of it already late
            enqueue(s, rng.choice(names), f"q{i}", at=T0 - rng.uniform(0.0, 0.05), items=rng.choice((1, 2)))
        sched = Scheduler(side_fetch=True)
        view = View(s, T0)
        for name in names:
            r = req(s, name, f"r{name}", items=rng.choice((1, 2)))
            finish, grace_s = sched._planned_finish(s, r, T0)
            whole = Scheduler._grace_s(view, name, s.profiles[name], r.items)
            assert grace_s in (0.0, whole)
            assert (finish - (r.deadline + grace_s) > 0) == (finish - (r.deadline + whole) > 0)
            checked += 1
            graced += grace_s > 0
            skipped += grace_s == 0.0 < whole  # on time: the grace was not needed
        for name in s.nonempty():
            fq, prof = s.queues[name], s.profiles[name]
            keep, rejects = sched._triage(View(s, T0), fq, prof, T0, sched.may_fetch(s, name))
            ref = View(s, T0)  # the rule with the grace counted for every request
            expected = {}
            for q in fq.requests:
                ests = [e for d in range(ref.n) if (e := ref.estimate(name, prof, q.items, d, ref.free_at[d]))]
                ests += ref.side_estimates(name, prof, q.items, T0, sched.may_fetch(s, name))
                late = min(e.finish for e in ests) - (q.deadline + Scheduler._grace_s(ref, name, prof, q.items))
                expected[q.id] = math.ceil(late) if late > 0 else None
            assert {q.id: None for q in keep} | {x.request_id: x.retry_after for x in rejects} == expected
            dropped += len(rejects)
    assert checked == 300 and min(graced, skipped, dropped) > 10  # graces counted and left out, and drops, seen


def test_admit_inserts_in_deadline_order_and_updates_rate():
    s = node(1)
    fn(s, "f", slo_ms=100, late="serve")
    sch = Scheduler(rate_halflife_s=10.0)
    late_ = Request("late", "f", T0, T0 + 0.3)
    early = Request("early", "f", T0 + 0.01, T0 + 0.11)
    assert sch.admit(s, late_, T0) is None
    assert sch.admit(s, early, T0 + 0.01) is None
    fq = s.queues["f"]
    assert [r.id for r in fq.requests] == ["early", "late"]
    assert fq.last_arrival == T0 + 0.01
    assert fq.rate == pytest.approx(math.log(2) / 10 * (1 + 2 ** (-0.001)))


def test_rate_estimator_converges_and_decays():
    rate, last = 0.0, None
    for i in range(6000):  # 10 requests/s for 600 s, half-life 60 s
        t = T0 + i * 0.1
        rate, last = update_rate(rate, last, t, 60.0), t
    assert rate == pytest.approx(10.0, rel=0.01)
    assert rate_at(rate, last, last + 60.0, 60.0) == pytest.approx(rate / 2)
    assert rate_at(rate, None, last, 60.0) == 0.0


def test_rate_since_is_the_streams_rate_from_the_first_seconds():
    """The decaying count of a stream seen for 20 s of a 60 s half-life holds a fifth of its rate; corrected for
    the window it is the rate, and it needs no correction once the window is many half-lives."""
    rng = random.Random(7)
    rate, last, t = 0.0, None, T0
    while True:  # Poisson arrivals at 10/s, counted from T0
        t += rng.expovariate(10.0)
        if t > T0 + 20.0:
            break
        rate, last = update_rate(rate, last, t, 60.0), t
    now = T0 + 20.0
    assert rate_at(rate, last, now, 60.0) == pytest.approx(10.0 * (1 - 2 ** (-20 / 60)), rel=0.15)  # ~2.1/s
    assert rate_since(rate, last, now, 60.0, since=T0) == pytest.approx(10.0, rel=0.15)
    assert rate_since(rate, last, now, 60.0, since=-math.inf) == rate_at(rate, last, now, 60.0)
    assert rate_since(rate, last, now + 1200.0, 60.0, since=T0) == pytest.approx(rate_at(rate, last, now + 1200.0,
                                                                                       60.0), rel=1e-5)
    # One arrival at the window's start: 1/s (the window taken as at least 1 s), not 1/0.
    one = update_rate(0.0, None, T0, 60.0)
    assert rate_since(one, T0, T0, 60.0, since=T0) == pytest.approx(1.0, rel=0.01)


def test_values_rate_a_function_counted_lately_at_its_corrected_rate():
    """Two models alike on a device, with the same decaying count: the one the node began counting 10 s ago
    has 9 times the rate (1 / (1 - 2^(-10/60))), so more value, in the ratio of (rate + recency)."""
    s = node(1)
    for name, since in (("lately", T0 - 10.0), ("long", -math.inf)):
        fq = fn(s, name)
        fq.rate, fq.last_arrival, fq.counted_since = 0.05, T0 - 2.0, since
        s.devices[0].resident.add(name)
    v = Scheduler().values(s, 0, T0)
    raw = rate_at(0.05, T0 - 2.0, T0, 60.0)
    recency = 1 / (2.0 + 1.0)
    assert v["lately"] / v["long"] == pytest.approx((raw / (1 - 2 ** (-10 / 60)) + recency) / (raw + recency))


# --- dropping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("late", ["refuse", "serve"])
def test_decide_drops_hopeless_requests_only_for_refuse(late):
    s = node(1)
    fn(s, "f", slo_ms=50, late=late)
    s.devices[0].resident.add("f")
    busy(s, 0, T0 + 1.0)
    enqueue(s, "f", "hopeless", at=T0)  # due at +0.05 s; the device frees at +1 s
    enqueue(s, "f", "fine", at=T0 + 2.0)  # due at +2.05 s
    dec = Scheduler().decide(s, T0)
    assert dec.dispatches == ()
    if late == "refuse":
        (r,) = dec.rejects
        assert (r.request_id, r.status) == ("hopeless", 503) and r.retry_after == 1.0
    else:
        assert dec.rejects == ()


def test_apply_removes_dispatched_and_rejected_and_marks_devices_busy():
    s = node(2, LinkProfile(h2d_GBps=(50.0,)))
    fn(s, "f", nbytes=500 * MB, slo_ms=100)
    fn(s, "g", slo_ms=20)
    s.devices[1].resident.add("g")
    enqueue(s, "f", "rf")
    enqueue(s, "g", "old", at=T0 - 1.0)  # long past its deadline
    sch = Scheduler(swap_piece_ms=0)
    dec = sch.decide(s, T0)
    assert [r.request_id for r in dec.rejects] == ["old"]
    d = only(dec)
    sch.apply(s, dec, T0)
    assert s.queued == 0
    dev = s.devices[d.device]
    assert dev.running == "f" and dev.busy_until == pytest.approx(T0 + d.expected_ms / 1000)
    assert dev.copying_until == pytest.approx(T0 + 0.010)
    assert dev.last_used["f"] == T0


# --- eviction values ---------------------------------------------------------------------------------

def _values_state() -> NodeState:
    s = node(2)
    for name in ("busy", "pop", "rare", "recent", "stale", "heavy", "light"):
        fq = fn(s, name, nbytes=1 * GB, exec_ms={1: 1.0})
        fq.rate, fq.last_arrival = 0.0, None
        s.devices[0].resident.add(name)
    s.queues["pop"].rate, s.queues["pop"].last_arrival = 5.0, T0 - 10
    s.queues["rare"].rate, s.queues["rare"].last_arrival = 0.5, T0 - 10
    s.devices[0].last_used.update(recent=T0 - 5, stale=T0 - 500, heavy=T0 - 50, light=T0 - 50)
    s.profiles["light"].exec_ms[1] = 50.0  # computes longer than its 20 ms copy: cheap to reload
    enqueue(s, "busy", "r1")
    return s


@pytest.mark.parametrize("policy", ["swapserve", "fifo_lru"])
def test_idle_functions_are_not_visited_and_emptied_queues_leave_the_waiting_set(policy):
    s = node(n=1)
    for i in range(500):
        fn(s, f"f{i:03d}")
    sched = Scheduler(policy, swap_piece_ms=0)  # type: ignore[arg-type]
    assert sched.admit(s, req(s, "f123", "a"), T0) is None
    assert sched.admit(s, req(s, "f007", "b"), T0) is None
    assert s.waiting == {"f123", "f007"} and s.queued == 2 and s.nonempty() == ["f007", "f123"]
    d = sched.decide(s, T0)
    sched.apply(s, d, T0)
    assert len(d.dispatches) == 1 and s.queued == 1
    assert s.nonempty() == [n for n in ("f007", "f123") if n != d.dispatches[0].function]
    assert len(s.waiting) == 1  # the emptied queue was dropped from the set
    s.devices[0].busy_until = None
    sched.apply(s, d2 := sched.decide(s, T0), T0)
    assert len(d2.dispatches) == 1 and s.queued == 0 and s.nonempty() == [] and s.waiting == set()


def test_values_expected_reuse():
    s = _values_state()
    v = Scheduler().values(s, 0, T0)
    assert v["busy"] == math.inf
    assert v["pop"] > v["rare"]  # popularity
    assert v["recent"] > v["stale"]  # recency
    assert v["heavy"] > v["light"]  # cost to bring back
    assert all(math.isfinite(x) and x > 0 for k, x in v.items() if k != "busy")
    busy(s, 1, T0 + 1, running="stale")  # in flight somewhere: never evicted
    assert Scheduler().values(s, 0, T0)["stale"] == math.inf


def test_values_per_byte_and_cheaper_when_a_peer_holds_it():
    s = node(2, LinkProfile(h2d_GBps=(50.0,), d2d_GBps=300.0))
    # Same reuse and the same reload penalty (19.3 ms: 40.3 - 21 and 20.3 - 1), twice the bytes: half the value.
    for name, nbytes, exec_ms in (("big", 2 * GB, 21.0), ("small", 1 * GB, 1.0)):
        fq = fn(s, name, nbytes=nbytes, exec_ms={1: exec_ms})
        fq.rate, fq.last_arrival = 1.0, T0
        s.devices[0].resident.add(name)
    v = Scheduler(peer_copies=True).values(s, 0, T0)
    assert v["big"] == pytest.approx(v["small"] / 2)
    s.devices[1].resident.add("small")
    s.touch("small")  # as the controller does when a worker reports it
    assert Scheduler(peer_copies=True).values(s, 0, T0)["small"] < v["small"]  # an NVLink hop away on device 1
    assert Scheduler().values(s, 0, T0)["small"] == v["small"]  # not where peer copies are off


def test_slo_values_weigh_a_swaps_cost_as_a_share_of_the_slo():
    """Two models whose next request a swap would slow alike (the same bytes, compute and reuse): in ms they are
    worth the same; as shares of their SLOs the one with the tighter SLO is worth four times as much, and a
    model with room in its SLO to swap goes before it though it would cost more ms."""
    s = node(1)
    for name, slo_ms, nbytes in (("tight", 10.0, 1 * GB), ("loose", 40.0, 1 * GB), ("big", 40.0, 2 * GB)):
        fq = fn(s, name, nbytes=nbytes, slo_ms=slo_ms)
        fq.rate, fq.last_arrival = 1.0, T0
        s.devices[0].resident.add(name)
    in_ms = Scheduler().values(s, 0, T0)
    assert in_ms["tight"] == in_ms["loose"]
    in_slo = Scheduler(slo_values=True).values(s, 0, T0)
    assert in_slo["tight"] == pytest.approx(4 * in_slo["loose"])
    assert in_slo["tight"] == pytest.approx(in_ms["tight"] / 10.0)
    # The big model costs 39.3 ms to bring back against 19.3 (40 ms of copy at 50 GB/s against 20): per GB a
    # little more, so in ms the tight model goes first, and as a share of the SLOs the big one does.
    assert in_ms["big"] > in_ms["tight"]
    assert in_slo["big"] < in_slo["tight"]


def test_switching_slo_values_on_a_running_node_values_every_model_anew():
    """The values of one measure are not mixed with the other's: a switch makes the next swap compute a device's
    values whole, though they were computed within VALUE_REUSE_S."""
    s = node(1)
    for name, slo_ms in (("tight", 10.0), ("loose", 40.0)):
        fq = fn(s, name, slo_ms=slo_ms)
        fq.rate, fq.last_arrival = 1.0, T0
        s.devices[0].resident.add(name)
    sched = Scheduler()
    before = sched.values(s, 0, T0)
    sched.configure(s, {"slo_values": True})
    after = sched.values(s, 0, T0)
    assert after["tight"] == pytest.approx(4 * after["loose"]) and after["tight"] == pytest.approx(before["tight"] / 10)
    assert s.devices[0].value_basis == (False, True)
    sched.configure(s, {"slo_values": False})
    assert sched.values(s, 0, T0) == before
    sched.refresh_values(s, T0)  # the refresh too: one of another basis is computed whole
    assert s.devices[0].value_basis == (False, False)


def test_values_are_reused_briefly_and_computed_again_for_what_was_touched():
    """A device's values are reused for VALUE_REUSE_S, except for the functions touched meanwhile (whoever
    changes a use, an arrival, a share of a device — joining or leaving it too — or a profile says so:
    NodeState.touch), computed at once, or forgotten where they are gone."""
    from swapserve.scheduler.core import VALUE_REUSE_S

    s = node(1)
    for name in ("a", "b", "c"):
        fq = fn(s, name, nbytes=GB, exec_ms={1: 1.0})
        fq.rate, fq.last_arrival = 1.0, T0
        s.devices[0].resident.add(name)
    sch = Scheduler()
    v = sch.values(s, 0, T0)
    s.queues["a"].rate = 5.0  # a rate estimate moved without a new arrival: the value is reused for a while
    assert sch.values(s, 0, T0 + VALUE_REUSE_S / 2)["a"] == v["a"]
    assert sch.values(s, 0, T0 + VALUE_REUSE_S * 2)["a"] > v["a"]  # then computed anew
    now = T0 + VALUE_REUSE_S * 2
    before = sch.values(s, 0, now)
    s.devices[0].last_used["b"] = s.devices[0].last_used["c"] = now  # two uses, one of them said
    s.touch("b")
    after = sch.values(s, 0, now)
    assert after["b"] > before["b"] and after["c"] == before["c"]  # c's until the next whole computation
    s.devices[0].resident.discard("b")
    s.devices[0].partial["b"] = 0.5  # pages taken
    s.touch("b")
    assert sch.values(s, 0, now)["b"] != after["b"]
    enqueue(s, "a", "r1")  # queued: never a victim, whatever was computed before
    assert sch.values(s, 0, now)["a"] == math.inf
    s.devices[0].partial.pop("b")
    s.touch("b")
    assert "b" not in sch.values(s, 0, now) and "b" not in s.devices[0].value_cache  # gone from the device
    fn(s, "d", nbytes=GB)
    s.devices[0].partial["d"] = 0.25
    s.touch("d")
    assert "d" in sch.values(s, 0, now)  # new here: valued at once
    fn(s, "e", nbytes=GB)
    sch.apply(s, Decision((Dispatch(0, "e", (), "host", 5.0, copy_ms=5.0),)), now)  # a run of it starts here
    assert sch.values(s, 0, now)["e"] == math.inf  # valued (apply touches it), a victim never


def test_a_refresh_round_heals_what_joined_or_left_untouched():
    """Whoever changes what a device holds touches the function (the controller does, on every path); should a
    change go untouched, the next refresh round, which starts from what the device holds, values what joined
    and forgets what left."""
    from swapserve.scheduler.core import VALUE_REUSE_S

    s = node(1)
    for name in ("a", "b"):
        fn(s, name, nbytes=GB, exec_ms={1: 1.0})
        s.devices[0].resident.add(name)
    sch = Scheduler()
    assert set(sch.values(s, 0, T0)) == {"a", "b"}
    s.devices[0].resident.discard("a")  # untouched: the values reused in the window still name it
    fn(s, "c", nbytes=GB)
    s.devices[0].partial["c"] = 0.5
    assert set(sch.values(s, 0, T0 + VALUE_REUSE_S / 4)) == {"a", "b"}
    while sch.refresh_values(s, T0 + VALUE_REUSE_S / 2):
        pass
    assert set(s.devices[0].value_cache) == {"b", "c"} == set(sch.values(s, 0, T0 + VALUE_REUSE_S / 2))


def test_values_refreshed_off_the_request_path_half_a_window_early():
    """refresh_values (the controller's, once a pass's dispatches are sent) computes whole the values of each
    serving device half a window old or more, the same values a swap's decision would have computed then, so
    that the swaps of the next half window only reuse them; fresher devices, a device out of service and the
    baselines' values (no cache) are left alone."""
    from swapserve.scheduler.core import VALUE_REUSE_S

    s = node(3)
    for name in ("a", "b"):
        fq = fn(s, name, nbytes=GB, exec_ms={1: 1.0})
        fq.rate, fq.last_arrival = 1.0, T0
        for d in s.devices:
            d.resident.add(name)
    s.devices[2].out = True
    sch = Scheduler()
    v0 = sch.values(s, 0, T0)["a"]
    v1 = sch.values(s, 1, T0 + VALUE_REUSE_S / 4)["a"]
    later = T0 + VALUE_REUSE_S / 2
    s.queues["a"].rate = 5.0  # moved without a touch: only a whole computation sees it
    sch.refresh_values(s, later)
    assert [d.value_cache_at for d in s.devices] == [later, T0 + VALUE_REUSE_S / 4, -math.inf]
    assert s.devices[0].value_cache["a"] > v0 and s.devices[1].value_cache["a"] == v1
    assert sch.values(s, 0, later + VALUE_REUSE_S * 0.9)["a"] == s.devices[0].value_cache["a"]  # reused after
    fifo = node(1)
    fn(fifo, "a")
    fifo.devices[0].resident.add("a")
    Scheduler("fifo_lru").refresh_values(fifo, later)
    assert fifo.devices[0].value_cache_at == -math.inf


def test_values_refreshed_in_slices_while_the_loop_goes_on():
    """refresh_values values a device's models VALUE_SLICE at a time (True while a round is unfinished), so
    that the controller's loop is never held for a whole device's computation; the round ends with the values a
    whole computation gives at the same time, and only then counts as one. A model gone meanwhile is not valued;
    a whole computation (a swap finding the cache old) or forgetting the values ends the round."""
    from swapserve.scheduler.core import VALUE_REUSE_S, VALUE_SLICE

    s = node(1)
    names = [f"f{i:03d}" for i in range(2 * VALUE_SLICE + 10)]
    for i, name in enumerate(names):
        fq = fn(s, name, nbytes=GB // (1 + i % 7), exec_ms={1: 1.0 + i % 5})
        fq.rate, fq.last_arrival = 0.1 + i / 100, T0 - i
        if i % 3:
            s.devices[0].resident.add(name)
        else:
            s.devices[0].partial[name] = 0.3
    sch = Scheduler()
    sch.values(s, 0, T0)
    later = T0 + VALUE_REUSE_S / 2
    for q in s.queues.values():
        q.rate *= 2  # moved without a touch: only a whole computation (or a refresh) sees it
    s.touch(names[5])  # valued by the round as it is now: no swap values it again
    assert sch.refresh_values(s, later)
    assert s.devices[0].value_cache_at == T0 and len(s.devices[0].value_round) == VALUE_SLICE + 10
    s.devices[0].partial.pop(names[0])  # gone before its slice: not valued, dropped at the next swap
    assert sch.refresh_values(s, later)
    assert not sch.refresh_values(s, later)
    assert s.devices[0].value_cache_at == later and not s.devices[0].value_round
    assert names[5] not in s.devices[0].value_touched
    whole = Scheduler().values(s, 0, later, whole=True)
    assert sch.values(s, 0, later) == whole and names[0] not in whole
    assert not sch.refresh_values(s, later + VALUE_REUSE_S / 4)  # fresh: nothing to do
    t = later + VALUE_REUSE_S / 2
    assert sch.refresh_values(s, t)
    s.forget_values()  # the models changed: the next swap values them whole, no round is left half done
    assert not s.devices[0].value_round and s.devices[0].value_cache_at == -math.inf
    assert sch.refresh_values(s, t) and s.devices[0].value_round
    sch.values(s, 0, t + VALUE_REUSE_S)  # a swap found them old: whole, the round ends
    assert not s.devices[0].value_round and s.devices[0].value_cache_at == t + VALUE_REUSE_S


def test_values_name_what_each_device_holds_through_random_work():
    """Through random arrivals, decisions, runs starting and ending and residency changes (each touching its
    function, as the controller does) and refresh rounds, every device's values name exactly the functions it
    holds or runs: none it holds is left unvalued (a worker evicts an unvalued model first)."""
    import random

    from swapserve.scheduler.core import _held

    rng = random.Random(7)
    s = NodeState([DeviceState(i, 8 * GB, side=[SideLane()]) for i in range(2)], {}, {},
                  LinkProfile(h2d_GBps=(50.0, 50.0), d2d_GBps=200.0, fetch_GBps=20.0))
    names = [f"f{i:02d}" for i in range(40)]
    for name in names:
        fn(s, name, nbytes=rng.choice((1, 2, 3)) * GB // 2, exec_ms={1: rng.uniform(1.0, 5.0)}, slo_ms=50.0)
    sch = Scheduler(peer_copies=True)
    now, running, checked = T0, [], 0
    for step in range(3000):
        now += rng.uniform(0.0, 0.03)
        op = rng.random()
        if op < 0.35:
            name = rng.choice(names)
            sch.admit(s, Request(f"r{step}", name, now, now + 0.05), now)
            decision = sch.decide(s, now)
            sch.apply(s, decision, now)
            running += [(d.device, d.lane, d.function) for d in decision.dispatches]
        elif op < 0.6 and running:
            device, lane, name = running.pop(rng.randrange(len(running)))
            s.devices[device].release(lane, now)
            s.touch(name)  # as the dispatcher does when a run ends
            if rng.random() < 0.7:  # the worker reports it whole there now
                s.devices[device].resident.add(name)
                s.devices[device].partial.pop(name, None)
        elif op < 0.85:
            d, name = rng.choice(s.devices), rng.choice(names)
            kind = rng.random()
            d.resident.discard(name)
            d.partial.pop(name, None)
            if kind < 0.4:
                d.resident.add(name)
            elif kind < 0.7:
                d.partial[name] = rng.random()
            s.touch(name)  # as refresh_residency does for every change a worker reports
        else:
            while sch.refresh_values(s, now):
                pass
        for q in s.queues.values():  # nothing waits long here: the checks are about what devices hold
            q.requests.clear()
        s.waiting.clear()
        for d in s.devices:
            assert set(sch.values(s, d.index, now)) == _held(d), (step, d.index)
            checked += 1
    assert checked == 6000 and running  # the walk ran runs and left some in flight


def test_arrivals_dispatches_and_completions_touch_their_function():
    """Arrivals, dispatches and completions touch their function (every device: a peer's holding counts)."""
    s = node(2)
    fn(s, "f")
    sch = Scheduler()
    assert sch.admit(s, req(s, "f", "r1"), T0) is None
    assert all(d.value_touched == {"f"} for d in s.devices)
    for d in s.devices:
        d.value_touched.clear()
    sch.apply(s, sch.decide(s, T0), T0)
    assert all(d.value_touched == {"f"} for d in s.devices)
    for d in s.devices:
        d.value_touched.clear()
    sch.observe_completion(s, "f", 0, 1, 1.0, True, 5.0, T0 + 0.01)
    assert all(d.value_touched == {"f"} for d in s.devices)


def test_dispatch_carries_values_for_its_device():
    s = _values_state()
    s.queues["busy"].requests.clear()
    enqueue(s, "pop", "r1")
    d = only(Scheduler().decide(s, T0))
    assert d.device == 0 and d.function == "pop" and d.source == "resident"
    assert d.values == {}  # a resident run brings nothing in, so it evicts nothing: no values to send
    s.devices[0].resident.discard("pop")
    s.devices[1].busy_until, s.devices[1].running = T0 + 100, "busy"  # only device 0 can take it
    d = only(Scheduler().decide(s, T0))
    assert d.device == 0 and d.function == "pop" and d.source == "host"
    assert set(d.values) == s.devices[0].resident  # every model it may evict, valued
    assert d.values["busy"] == math.inf  # queued or running elsewhere: never a victim


# --- the fifo_lru baseline ---------------------------------------------------------------------------

def test_fifo_lru_arrival_order_no_batching_first_idle_device_no_drops():
    s = node(2)
    fn(s, "f", slo_ms=1000, max_batch=8)
    fn(s, "g", slo_ms=10)
    s.devices[1].resident.add("f")
    enqueue(s, "f", "f1", at=T0)
    enqueue(s, "f", "f2", at=T0 + 0.001)
    enqueue(s, "g", "g1", at=T0 + 0.002)  # due first, arrived last
    sch = Scheduler("fifo_lru")
    dec = sch.decide(s, T0 + 0.003)
    assert [(d.device, d.request_ids, d.source) for d in dec.dispatches] == [
        (0, ("f1",), "host"), (1, ("f2",), "resident")]
    assert dec.rejects == ()

    busy(s, 0, T0 + 10.0)
    busy(s, 1, T0 + 10.0)
    s.queues["f"].requests.clear()
    assert sch.decide(s, T0 + 0.003) == sch.decide(s, T0 + 5.0)  # g1 is hopeless, and kept
    assert sch.admit(s, req(s, "g", "g2", T0 + 5.0), T0 + 5.0) is None  # no early refusal either


def test_fifo_lru_values_are_recency():
    s = _values_state()
    v = Scheduler("fifo_lru").values(s, 0, T0)
    assert v["recent"] == T0 - 5 and v["stale"] == T0 - 500 and v["pop"] == -math.inf


# --- profile refinement ------------------------------------------------------------------------------

def test_observe_completion_refines_exec_from_resident_runs_only():
    s = node(1)
    fn(s, "f", exec_ms={1: 10.0})
    sch = Scheduler()
    sch.observe_completion(s, "f", 0, 1, 5.0, False, 5.0, T0)
    e = s.profiles["f"].exec_ms[1]
    assert 5.0 < e < 10.0
    for _ in range(40):
        sch.observe_completion(s, "f", 0, 1, 5.0, False, 5.0, T0)
    assert s.profiles["f"].exec_ms[1] == pytest.approx(5.0, rel=1e-3)
    assert s.devices[0].last_used["f"] == T0

    sch.observe_completion(s, "f", 0, 1, 500.0, False, 500.0, T0)  # an outlier moves it boundedly
    assert 5.0 < s.profiles["f"].exec_ms[1] < 8.01  # the sample counts as 4x (20 ms), weighted 0.2

    before = dict(s.profiles["f"].exec_ms)
    sch.observe_completion(s, "f", 0, 1, 99.0, True, 99.0, T0)  # swapped: exec untouched
    assert s.profiles["f"].exec_ms == before

    sch.observe_completion(s, "f", 0, 4, 12.0, False, 12.0, T0)  # a new batch size is learnt
    assert s.profiles["f"].exec_ms[4] == pytest.approx(12.0)


def test_observe_completion_refines_swap_overhead():
    s = node(1)
    fn(s, "f", nbytes=1 * GB, exec_ms={1: 1.0}, overhead_ms=0.3)  # a copy of 20 ms
    sch = Scheduler()
    for _ in range(60):
        sch.observe_completion(s, "f", 0, 1, 21.0, True, 22.0, T0, copy_ms=20.0)
    assert s.profiles["f"].swap_overhead_ms == pytest.approx(2.0, rel=1e-3)
    sch.observe_completion(s, "f", 0, 1, 1.0, True, 5.0, T0, copy_ms=20.0)  # faster than the copy: 0
    assert 0.0 <= s.profiles["f"].swap_overhead_ms < 2.0
    learnt = s.profiles["f"].swap_overhead_ms
    # A swap placed ahead copied while the run before it executed: its 1 ms says nothing of a swap's overhead.
    sch.observe_completion(s, "f", 0, 1, 1.0, True, 1.0, T0, copy_ms=20.0, ahead=True)
    assert s.profiles["f"].swap_overhead_ms == learnt


def test_rejects_bad_configuration():
    with pytest.raises(ValueError):
        Scheduler("lifo")  # type: ignore[arg-type]
    s = node(1)
    with pytest.raises(KeyError):
        Scheduler().admit(s, Request("r", "nope", T0, T0 + 1), T0)


# --- the dedicated baseline -------------------------------------------------------------------------


def test_dedicated_serves_only_pinned_functions_on_their_device():
    state = NodeState([DeviceState(0, 1 << 30), DeviceState(1, 1 << 30)], {}, {}, LinkProfile((50.0,)))
    for name, dev in (("a", 1), ("b", 0)):
        state.queues[name] = FunctionQueue(name, 100.0, 4, 16)
        state.profiles[name] = ModelProfile(100 << 20, {1: 2.0})
        state.dedicated[name] = dev
        state.devices[dev].resident.add(name)
    state.queues["c"] = FunctionQueue("c", 100.0, 4, 16)
    state.profiles["c"] = ModelProfile(100 << 20, {1: 2.0})
    s = Scheduler("dedicated")
    rej = s.admit(state, Request("c1", "c", 0.0, 0.1), 0.0)
    assert rej is not None and rej.status == 503 and "no dedicated device" in rej.reason
    for i in range(3):
        assert s.admit(state, Request(f"a{i}", "a", 0.0, 0.1), 0.0) is None
    assert s.admit(state, Request("b0", "b", 0.0, 0.1), 0.0) is None
    d = s.decide(state, 0.0)
    by_dev = {x.device: x for x in d.dispatches}
    assert by_dev[1].function == "a" and by_dev[1].request_ids == ("a0", "a1", "a2")  # batched, on its own device
    assert by_dev[0].function == "b" and by_dev[0].source == "resident"
    assert by_dev[1].values == {}  # resident: nothing to evict


def test_dedicated_never_moves_a_function_to_another_idle_device():
    state = NodeState([DeviceState(0, 1 << 30), DeviceState(1, 1 << 30)], {}, {}, LinkProfile((50.0,)))
    state.queues["a"] = FunctionQueue("a", 100.0, 1, 16)
    state.profiles["a"] = ModelProfile(100 << 20, {1: 2.0})
    state.dedicated["a"] = 0
    state.devices[0].resident.add("a")
    state.devices[0].busy_until = 0.05
    s = Scheduler("dedicated")
    assert s.admit(state, Request("a0", "a", 0.0, 0.1), 0.0) is None
    assert s.decide(state, 0.0).dispatches == ()  # device 1 idle, but not a's


# --- side lanes ----------------------------------------------------------------------------------------

def lanes(s: NodeState, side: int = 1) -> NodeState:
    for d in s.devices:
        d.side = [SideLane() for _ in range(side)]
    return s


def test_resident_request_runs_in_the_side_lane_beside_a_swap():
    """The head-of-line case: the device's first lane swaps a big model in for 20 ms; a resident model's
    request starts now in the side lane, slowed by the measured contention, instead of queueing behind it."""
    s = lanes(node(1, LinkProfile(h2d_GBps=(50.0,), exec_slowdown_copying=1.25)))
    fn(s, "hit", exec_ms={1: 2.0}, slo_ms=10.0)
    s.devices[0].resident.add("hit")
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "hit", "r1")
    sched = Scheduler()
    d = only(sched.decide(s, T0))
    assert (d.device, d.lane, d.source, d.request_ids) == (0, 1, "resident", ("r1",))
    assert d.expected_ms == pytest.approx(2.5)
    sched.apply(s, Decision((d,)), T0)
    dev = s.devices[0]
    assert dev.side == [SideLane(pytest.approx(T0 + 0.0025), "hit")]
    assert (dev.running, dev.busy_until) == ("big", T0 + 0.020)  # the first lane's state is untouched
    assert sched.values(s, 0, T0)["hit"] == math.inf  # in flight: never evicted under it
    dev.release(1, T0)
    assert dev.side == [SideLane()] and not dev.idle


def test_side_lane_never_swaps():
    s = lanes(node(1))
    fn(s, "cold", exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "cold", "r1")
    assert Scheduler().decide(s, T0).dispatches == ()  # waits for the first lane, the only one that copies
    s.devices[0].partial["cold"] = 0.5
    assert Scheduler().decide(s, T0).dispatches == ()


def test_side_lane_taken_on_a_tie_keeping_the_first_lane_for_swaps():
    s = lanes(node(1))
    fn(s, "hit", exec_ms={1: 2.0})
    fn(s, "cold", exec_ms={1: 1.0}, nbytes=100 * MB)
    s.devices[0].resident.add("hit")
    enqueue(s, "hit", "r1")
    enqueue(s, "cold", "r2", at=T0 + 0.001)
    ds = Scheduler().decide(s, T0).dispatches
    assert [(d.function, d.lane, d.source) for d in ds] == [("hit", 1, "resident"), ("cold", 0, "host")]


def test_without_side_lanes_a_hit_waits_behind_the_swap():
    s = node(1)
    fn(s, "hit", exec_ms={1: 2.0})
    s.devices[0].resident.add("hit")
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "hit", "r1")
    assert Scheduler().decide(s, T0).dispatches == ()


def test_admission_counts_the_side_lane():
    """A 10 ms SLO behind a 20 ms swap: refused with one lane, admitted (and planned in the side lane) with two."""
    for with_lanes, refused in ((False, True), (True, False)):
        s = node(1, LinkProfile(h2d_GBps=(50.0,), exec_slowdown_copying=1.25))
        if with_lanes:
            lanes(s)
        fn(s, "hit", exec_ms={1: 2.0}, slo_ms=10.0)
        s.devices[0].resident.add("hit")
        busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
        assert (Scheduler().admit(s, req(s, "hit", "r1"), T0) is not None) is refused


def test_several_side_lanes_run_resident_models_side_by_side():
    """Three lanes: two resident models' requests during a swap run at once, one in each side lane, each
    slowed by what runs beside it as measured (the first lane's swap counts as a run beside, and its copy)."""
    link = LinkProfile(h2d_GBps=(50.0,), exec_slowdown_copying=1.1, exec_slowdown_beside=(1.2, 1.5))
    s = lanes(node(1, link), side=2)
    for f in ("a", "b", "c"):
        fn(s, f, exec_ms={1: 2.0}, slo_ms=20.0)
        s.devices[0].resident.add(f)
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    for i, f in enumerate(("a", "b", "c")):
        enqueue(s, f, f"r{i}", at=T0 + i * 1e-6)
    sched = Scheduler()
    ds = sched.decide(s, T0).dispatches
    assert [(d.function, d.lane) for d in ds] == [("a", 1), ("b", 2)]  # c waits: every lane is taken
    # a: the first lane beside it (1.2 × 1.1); b: the first lane and a (1.5 × 1.1).
    assert [d.expected_ms for d in ds] == [pytest.approx(2.0 * 1.2 * 1.1), pytest.approx(2.0 * 1.5 * 1.1)]
    sched.apply(s, Decision(ds), T0)
    assert [ln.running for ln in s.devices[0].side] == ["a", "b"]
    assert "c" in s.queues and [r.id for r in s.queues["c"].requests] == ["r2"]
    s.devices[0].release(2, T0 + 0.003)  # b's lane frees first: c takes it
    d = only(sched.decide(s, T0 + 0.003))
    assert (d.function, d.lane) == ("c", 2)
    assert sched.values(s, 0, T0)["a"] == math.inf and s.devices[0].side_running == ("a",)


def test_a_side_lane_that_frees_first_is_the_one_waited_for():
    s = lanes(node(1), side=3)
    fn(s, "hot", exec_ms={1: 1.0})
    s.devices[0].resident.add("hot")
    busy(s, 0, until=T0 + 0.012, running="big", copying_until=T0 + 0.012)
    s.devices[0].side = [SideLane(T0 + 0.004, "x"), SideLane(T0 + 0.002, "y"), SideLane(T0 + 0.003, "z")]
    v = View(s, T0)
    assert v.side_lane(0) == 2
    e = v.side_estimate("hot", s.profiles["hot"], 1, 0, T0)
    assert (e.lane, e.start) == (2, T0 + 0.002)
    s.devices[0].side[2] = SideLane(T0 - 0.001, "z")  # overdue: frees "now", but a free lane goes first
    s.devices[0].side[0] = SideLane()
    assert View(s, T0).side_lane(0) == 1
    s.devices[0].side = [SideLane(T0 + 0.003, "x"), SideLane(T0 + 0.002, "y"), SideLane(T0 + 0.002, "z")]
    assert View(s, T0).side_lane(0) == 2  # of lanes that free alike, the lowest


def test_side_lanes_setting_limits_the_lanes_new_runs_take():
    s = lanes(node(1), side=2)
    for f in ("a", "b"):
        fn(s, f, exec_ms={1: 2.0}, slo_ms=20.0)
        s.devices[0].resident.add(f)
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "a", "r0")
    enqueue(s, "b", "r1", at=T0 + 1e-6)
    assert [(d.function, d.lane) for d in Scheduler(side_lanes=1).decide(s, T0).dispatches] == [("a", 1)]
    assert [d.lane for d in Scheduler(side_lanes=0).decide(s, T0).dispatches] == []
    assert [d.lane for d in Scheduler().decide(s, T0).dispatches] == [1, 2]
    # A run in a lane beyond the limit still slows the others.
    s.link = replace(s.link, exec_slowdown_beside=(1.5, 2.0))
    s.devices[0].side[1] = SideLane(T0 + 0.010, "b")
    s.queues["b"].requests.clear()
    d = only(Scheduler(side_lanes=1).decide(s, T0))
    assert (d.lane, d.expected_ms) == (1, pytest.approx(2.0 * 2.0))


def test_runs_beside_others_teach_the_slowdown_not_the_profile():
    """A model's own time stays its time alone; what runs beside others took over that teaches the node's
    slowdown for that many (every function's runs count), and the estimates use it."""
    s = lanes(node(1, LinkProfile(h2d_GBps=(50.0,), exec_slowdown_beside=(2.0,))), side=2)
    fn(s, "a", exec_ms={1: 2.0}, slo_ms=50.0)
    s.devices[0].resident.add("a")
    s.devices[0].side[0] = SideLane(T0 + 0.010, "other")
    enqueue(s, "a", "r1")
    sched = Scheduler()
    d = only(sched.decide(s, T0))
    assert (d.lane, d.beside, d.expected_ms) == (2, 1, pytest.approx(4.0))
    for _ in range(200):  # it took 2.6 ms beside one other: 1.3×
        sched.observe_completion(s, "a", 0, 1, 2.6, False, 2.6, T0, beside=1)
    assert s.profiles["a"].exec_ms == {1: 2.0}
    assert s.link.exec_slowdown_beside == (pytest.approx(1.3, abs=1e-3),)
    assert only(sched.decide(s, T0)).expected_ms == pytest.approx(2.6, abs=1e-2)
    sched.observe_completion(s, "a", 0, 1, 10.0, False, 10.0, T0, beside=3)  # three beside: never seen before
    assert len(s.link.exec_slowdown_beside) == 3 and s.link.exec_slowdown_beside[1] == pytest.approx(1.3, abs=1e-3)
    assert s.link.exec_slowdown_beside[2] > 1.3
    sched.observe_completion(s, "a", 0, 1, 1.0, False, 1.0, T0)  # alone: the profile, as before
    assert s.profiles["a"].exec_ms[1] == pytest.approx(2.0 + 0.2 * (1.0 - 2.0))
    for _ in range(500):  # faster than alone beside one (noise): the figure never drops below 1
        sched.observe_completion(s, "a", 0, 1, 0.5, False, 0.5, T0, beside=1)
    assert s.link.exec_slowdown_beside[0] == 1.0


def test_link_profile_slowdown_beside():
    link = LinkProfile((50.0,), exec_slowdown_beside=(1.1, 1.3))
    assert [link.beside(k) for k in range(5)] == [1.0, 1.1, 1.3, 1.3, 1.3]
    assert LinkProfile((50.0,)).beside(3) == 1.0


# --- queue-ahead ----------------------------------------------------------------------------------------

def test_queue_ahead_sends_the_next_swap_behind_the_run_in_progress():
    """One device swapping "big" until T0+20 ms: a cold model's request is sent now, queued behind it (the
    worker starts it when "big" ends), expected to start then; a second one waits for the slot."""
    s = node(1)
    fn(s, "cold", nbytes=100 * MB, exec_ms={1: 1.0})
    fn(s, "later", nbytes=100 * MB, exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "cold", "r1")
    enqueue(s, "later", "r2", at=T0 + 0.001)
    assert Scheduler(swap_piece_ms=0).decide(s, T0).dispatches == ()  # off: it waits for the lane to free
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True)
    d = only(sched.decide(s, T0))
    assert (d.function, d.request_ids, d.lane, d.source) == ("cold", ("r1",), 0, "host")
    assert d.copy_ms == pytest.approx(2.0) and d.expected_ms == pytest.approx(2.3)  # 100 MB at 50 GB/s + overhead
    sched.apply(s, Decision((d,)), T0)
    dev = s.devices[0]
    assert dev.queued is not None and (dev.queued.function, dev.queued.start) == ("cold", T0 + 0.020)
    assert (dev.running, dev.copying_until) == ("big", T0 + 0.020)
    assert dev.busy_until == pytest.approx(T0 + 0.0223)
    assert dev.first_lane == ("big", "cold")
    assert sched.values(s, 0, T0)["cold"] == math.inf  # in flight: never evicted under it
    assert sched.decide(s, T0).dispatches == ()  # one behind the run at most
    # "big" ends 2 ms late: "cold" starts then, its expected end and copy counted from there.
    dev.release(0, T0 + 0.022)
    assert (dev.running, dev.queued, dev.piece) == ("cold", None, False)
    assert dev.busy_until == pytest.approx(T0 + 0.0243) and dev.copying_until == pytest.approx(T0 + 0.024)
    dev.release(0, T0 + 0.0243)
    assert dev.idle and dev.first_lane == ()


def test_queue_ahead_within_a_limit_waits_until_the_run_ahead_is_that_close_to_its_end():
    """With queue_ahead_within_ms=3, a request is queued behind a run only once the run is expected to end
    within 3 ms; until then it stays in the controller's queue (where a later, more urgent request or another
    lane could still take the place), and the scheduler names when to decide again."""
    s = node(1)
    fn(s, "cold", nbytes=100 * MB, exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "cold", "r1")
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True, queue_ahead_within_ms=3.0)
    assert sched.decide(s, T0).dispatches == ()  # 20 ms to go: not yet
    assert sched.wake_at(s, T0) == pytest.approx(T0 + 0.017)
    d = only(sched.decide(s, T0 + 0.017))  # 3 ms to go: behind the run, as without a limit
    assert (d.function, d.request_ids, d.lane) == ("cold", ("r1",), 0)
    sched.apply(s, Decision((d,)), T0 + 0.017)
    assert sched.wake_at(s, T0 + 0.017) is None  # one behind the run already: nothing to wake for
    assert Scheduler(swap_piece_ms=0, queue_ahead=True).wake_at(s, T0) is None  # no limit: events only
    # A model already on the busy device waits for the window too (it would start there only when the run ends).
    s = node(1)
    fn(s, "warm", nbytes=100 * MB, exec_ms={1: 1.0})
    s.devices[0].resident.add("warm")
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "warm", "r2")
    assert sched.decide(s, T0).dispatches == ()
    assert only(sched.decide(s, T0 + 0.018)).request_ids == ("r2",)


def test_queue_ahead_fills_an_idle_lane_and_its_queue_in_one_decision():
    s = node(1)
    for name in ("a", "b", "c"):
        fn(s, name, nbytes=100 * MB, exec_ms={1: 1.0})
    enqueue(s, "a", "r1")
    enqueue(s, "b", "r2", at=T0 + 0.001)
    enqueue(s, "c", "r3", at=T0 + 0.002)
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True)
    decision = sched.decide(s, T0)
    assert [d.function for d in decision.dispatches] == ["a", "b"]  # EDF; "c" waits for the slot
    sched.apply(s, decision, T0)
    dev = s.devices[0]
    assert dev.running == "a" and dev.queued is not None and dev.queued.start == pytest.approx(T0 + 0.0023)
    # Planning sees "b"'s copy after "a"'s and both models there once the lane frees.
    view = View(s, T0)
    assert view.holds("a", 0, dev.busy_until) and view.holds("b", 0, dev.busy_until)
    assert sorted((c.start, c.end) for c in view.copies) == [
        (T0, pytest.approx(T0 + 0.002)), (pytest.approx(T0 + 0.0023), pytest.approx(T0 + 0.0043))]


def test_queue_ahead_prefers_an_idle_device_and_a_failed_successor_leaves_the_run():
    s = node(2)
    fn(s, "cold", nbytes=100 * MB, exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.020, running="big", copying_until=T0 + 0.020)
    enqueue(s, "cold", "r1")
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True)
    assert only(sched.decide(s, T0)).device == 1  # starts now on the idle device rather than in 20 ms
    s.queues["cold"].requests.clear()
    s.devices[1].busy_until, s.devices[1].running = T0 + 0.030, "other"
    enqueue(s, "cold", "r2")
    d = only(sched.decide(s, T0))
    assert d.device == 0  # the first lane that frees first
    sched.apply(s, Decision((d,)), T0)
    dev = s.devices[0]
    dev.release(0, T0 + 0.001, queued=True)  # the successor failed before it ran (its message never left)
    assert (dev.running, dev.busy_until, dev.queued) == ("big", T0 + 0.020, None)


def test_queue_ahead_never_sends_a_piece_of_a_swap_ahead():
    """A long swap with room would come in pieces: behind a busy lane it waits (a piece is there to let what
    arrives meanwhile go first); once the lane is idle its first piece goes."""
    s = node(1)
    fn(s, "big", nbytes=750 * MB, exec_ms={1: 3.0}, slo_ms=200.0)  # a 15 ms copy at 50 GB/s, time to spare
    busy(s, 0, until=T0 + 0.002, running="other", copying_until=T0 + 0.002)
    enqueue(s, "big", "r1")
    sched = Scheduler(swap_piece_ms=3.0, queue_ahead=True)
    assert sched.decide(s, T0).dispatches == ()
    s.devices[0].release(0, T0 + 0.002)
    d = only(sched.decide(s, T0 + 0.002))
    assert d.function == "big" and d.piece_bytes > 0


def test_queue_ahead_is_swapserve_only():
    for policy in ("fifo_lru", "dedicated"):
        s = node(1)
        fn(s, "cold", nbytes=100 * MB)
        s.dedicated["cold"] = 0
        busy(s, 0, until=T0 + 0.020, running="big")
        enqueue(s, "cold", "r1")
        assert Scheduler(policy, queue_ahead=True).decide(s, T0).dispatches == ()


# --- prefetch -------------------------------------------------------------------------------------------

def test_prefetch_places_a_cold_model_on_an_idle_device():
    s = node(2)
    fn(s, "cold", nbytes=500 * MB)
    busy(s, 0, until=T0 + 0.050)
    sched = Scheduler()
    d = sched.prefetch(s, "cold", T0)
    assert (d.device, d.function, d.request_ids, d.source, d.lane) == (1, "cold", (), "host", 0)
    # The copy, plus the node's overhead of a copy-only dispatch (its default until one has answered).
    assert d.copy_ms == pytest.approx(10.0) and d.expected_ms == pytest.approx(10.0 + s.link.copy_overhead_ms)
    sched.apply(s, Decision((d,)), T0)
    assert (s.devices[1].running, s.devices[1].copying_until) == ("cold", pytest.approx(T0 + 0.010))
    assert sched.prefetch(s, "cold", T0) is None  # arriving already


def test_no_prefetch_where_it_is_not_needed_or_would_wait():
    s = node(1)
    fn(s, "warm")
    s.devices[0].resident.add("warm")
    assert Scheduler().prefetch(s, "warm", T0) is None
    fn(s, "queued")
    enqueue(s, "queued", "r1")
    assert Scheduler().prefetch(s, "queued", T0) is None  # the next decision places it with its request
    fn(s, "cold")
    busy(s, 0, until=T0 + 0.050)
    assert Scheduler().prefetch(s, "cold", T0) is None  # never waits for a busy lane
    s.devices[0].busy_until = s.devices[0].running = None
    assert Scheduler("fifo_lru").prefetch(s, "cold", T0) is None
    assert Scheduler().prefetch(s, "cold", T0) is not None


# --- swaps in pieces ------------------------------------------------------------------------------------

def test_a_long_swap_with_room_comes_in_pieces_and_its_requests_stay_queued():
    s = node(1)
    fn(s, "big", nbytes=750 * MB, exec_ms={1: 3.0}, slo_ms=60.0)  # a 15 ms copy at 50 GB/s
    enqueue(s, "big", "r1")
    sched = Scheduler(swap_piece_ms=3.0)
    d = only(sched.decide(s, T0))
    assert (d.function, d.request_ids, d.source, d.lane) == ("big", (), "host", 0)
    assert d.piece_bytes == pytest.approx(150 * MB, rel=1e-6)  # 3 ms of the 15 ms copy
    # Its lane is planned busy for the copy and the node's overhead of a copy-only dispatch (1 ms by default).
    assert d.expected_ms == pytest.approx(4.0) and d.copy_ms == pytest.approx(3.0)
    sched.apply(s, Decision((d,)), T0)
    dev = s.devices[0]
    assert [r.id for r in s.queues["big"].requests] == ["r1"]  # still queued for the run
    assert (dev.running, dev.piece, dev.busy_until) == ("big", True, pytest.approx(T0 + 0.004))
    assert sched.decide(s, T0 + 0.001).dispatches == ()  # not planned as resident after the piece
    # The piece landed: the next piece covers the same share of what is still missing.
    dev.release(0, T0 + 0.003)
    dev.partial["big"] = 0.2
    d2 = only(sched.decide(s, T0 + 0.004))
    assert d2.piece_bytes == pytest.approx(150 * MB, rel=1e-6) and d2.source == "partial"


def test_between_pieces_what_is_due_first_runs():
    s = node(1)
    fn(s, "big", nbytes=750 * MB, exec_ms={1: 3.0}, slo_ms=60.0)
    fn(s, "small", nbytes=50 * MB, exec_ms={1: 1.0}, slo_ms=10.0)
    enqueue(s, "big", "b1")
    sched = Scheduler(swap_piece_ms=3.0)
    piece = only(sched.decide(s, T0))
    sched.apply(s, Decision((piece,)), T0)
    enqueue(s, "small", "s1", at=T0 + 0.001)  # arrives during the piece
    s.devices[0].release(0, T0 + 0.003)
    s.devices[0].partial["big"] = 0.2
    d = only(sched.decide(s, T0 + 0.003))
    assert (d.function, d.request_ids, d.piece_bytes) == ("small", ("s1",), 0)


def test_the_decision_that_sends_a_piece_keeps_what_is_due_later_from_queueing_behind_it():
    """The pass that sends a piece of "big" (due first) places "other" (due later) after it: "other" does not
    queue behind the piece, where it would have taken the lane's next turn from big's swap (session 33: a
    GPT-2 swap's three pieces on one GPU, then BERT-large queued behind the last, and the swap whole on the
    other GPU, 9 ms late); it goes where a lane is free, or waits."""
    def two_due(devices: int) -> NodeState:
        s = node(devices)
        fn(s, "big", nbytes=750 * MB, exec_ms={1: 6.0}, slo_ms=40.0)  # a 15 ms copy at 50 GB/s
        fn(s, "other", nbytes=250 * MB, exec_ms={1: 3.0}, slo_ms=60.0)  # a 5 ms copy: whole, no pieces
        enqueue(s, "big", "b1")
        enqueue(s, "other", "o1")
        return s

    sched = Scheduler(swap_piece_ms=3.0, queue_ahead=True)
    d = only(sched.decide(two_due(1), T0))
    assert (d.function, d.request_ids, d.device) == ("big", (), 0) and d.piece_bytes > 0
    s = two_due(2)
    busy(s, 1, until=T0 + 0.001, running="x")  # frees before the piece ends
    d, o = sched.decide(s, T0).dispatches
    assert (d.function, d.device, o.function, o.request_ids, o.device) == ("big", 0, "other", ("o1",), 1)
    assert d.piece_bytes > 0 and o.piece_bytes == 0


def test_a_swap_between_pieces_holds_its_lane_s_next_turn_against_what_is_due_later():
    """A piece of "big" is running; big's requests wait for the lane. What is due before them may still queue
    behind the piece (the room pieces leave); what is due after them neither queues there nor plans to start
    before big's swap (it would have pushed big past its deadline)."""
    def mid_pieces(slo_ms: float) -> NodeState:
        s = node(1)
        fn(s, "big", nbytes=750 * MB, exec_ms={1: 6.0}, slo_ms=40.0)  # a 15 ms copy at 50 GB/s
        fn(s, "other", nbytes=250 * MB, exec_ms={1: 3.0}, slo_ms=slo_ms)  # a 5 ms copy: whole, no pieces
        busy(s, 0, until=T0 + 0.002, running="big", copying_until=T0 + 0.002)
        s.devices[0].piece = True
        s.devices[0].partial["big"] = 0.2
        enqueue(s, "big", "b1")
        enqueue(s, "other", "o1")
        return s

    sched = Scheduler(swap_piece_ms=3.0, queue_ahead=True)
    assert sched.decide(mid_pieces(slo_ms=60.0), T0).dispatches == ()  # due after big: waits
    d = only(sched.decide(mid_pieces(slo_ms=20.0), T0))  # due before big: behind the piece
    assert (d.function, d.request_ids, d.device) == ("other", ("o1",), 0)
    # Once the piece has landed, big's next piece goes first, and holds the lane against the other again.
    s = mid_pieces(slo_ms=60.0)
    s.devices[0].release(0, T0 + 0.002)
    got = sched.decide(s, T0 + 0.002).dispatches
    assert [(x.function, x.piece_bytes > 0) for x in got] == [("big", True)]


def test_a_swap_runs_whole_when_short_late_or_off_or_not_swapserve():
    def first(nbytes: int, slo_ms: float, **kw) -> object:
        s = node(1)
        fn(s, "f", nbytes=nbytes, exec_ms={1: 3.0}, slo_ms=slo_ms)
        enqueue(s, "f", "r1")
        return only(Scheduler(**kw).decide(s, T0))

    assert first(250 * MB, 60.0).request_ids == ("r1",)  # a 5 ms copy: under two pieces
    assert first(750 * MB, 60.0).piece_bytes > 0
    assert first(750 * MB, 22.0).request_ids == ("r1",)  # 15.3 ms + 4 pieces' cost + 6 ms of room > 22 ms
    assert first(750 * MB, 60.0, swap_piece_ms=0).request_ids == ("r1",)
    assert first(750 * MB, 60.0, policy="fifo_lru").request_ids == ("r1",)
    with pytest.raises(ValueError, match="swap_piece_ms"):
        Scheduler(swap_piece_ms=-1)


def test_pieces_are_never_in_the_side_lane_and_resident_runs_go_on_beside_them():
    s = lanes(node(1))
    fn(s, "big", nbytes=750 * MB, exec_ms={1: 3.0}, slo_ms=60.0)
    fn(s, "hit", nbytes=50 * MB, exec_ms={1: 1.0}, slo_ms=10.0)
    s.devices[0].resident.add("hit")
    enqueue(s, "big", "b1")
    enqueue(s, "hit", "h1")
    sched = Scheduler(swap_piece_ms=3.0)
    got = {d.function: d for d in sched.decide(s, T0).dispatches}
    assert got["big"].lane == 0 and got["big"].piece_bytes > 0
    assert got["hit"].request_ids == ("h1",)


def test_pieces_teach_the_node_what_a_copy_with_no_run_costs_past_its_copy():
    """A piece planned as its 3 ms copy held its lane 4.6 ms: the node's copy overhead moves from its 1 ms default
    toward 1.6 (a twentieth of the way per piece); a stalled piece moves it at most as far as four times the
    figure would; the next piece's lane is planned busy for its copy and the learned overhead."""
    s = node(1)
    fn(s, "big", nbytes=750 * MB, exec_ms={1: 3.0}, slo_ms=60.0)
    sched = Scheduler(swap_piece_ms=3.0)
    assert s.link.copy_overhead_ms == 1.0
    sched.observe_completion(s, "big", 0, 0, 3.8, True, 4.6, T0, copy_ms=3.0)
    assert s.link.copy_overhead_ms == pytest.approx(1.0 + 0.05 * 0.6)
    learned = s.link.copy_overhead_ms
    sched.observe_completion(s, "big", 0, 0, 26.0, True, 27.0, T0, copy_ms=3.0)  # a 26 ms stall: clamped
    assert s.link.copy_overhead_ms == pytest.approx(learned + 0.05 * 3 * learned)
    assert s.profiles["big"].swap_overhead_ms == 0.3  # a copy with no run is no swapped run
    enqueue(s, "big", "r1")
    d = only(sched.decide(s, T0))
    assert d.piece_bytes > 0 and d.expected_ms == pytest.approx(3.0 + s.link.copy_overhead_ms)


def test_a_lane_overdue_past_the_grace_is_planned_to_go_on_as_far_again():
    """A lane whose run is past its expected end by more than the grace (2 ms) is planned to free as far after
    now as it is overdue beyond the grace (and what is queued behind it, and the models it brings in, that much
    later); one overdue by the grace or less frees now; one not yet due as planned."""
    assert LATE_GRACE_S == 0.002
    s = lanes(node(2))
    dev = s.devices[0]
    busy(s, 0, until=T0 + 0.003, running="gpt2")  # due 8 ms ago
    s.devices[0].side[0] = SideLane(T0 + 0.0095, "other")  # due 1.5 ms ago
    busy(s, 1, until=T0 + 0.013, running="vit")  # due in 2 ms
    s.devices[1].side[0] = SideLane(T0 + 0.012, "other")
    now = T0 + 0.011
    view = View(s, now)
    assert view.free_at == [pytest.approx(now + 0.006), T0 + 0.013]
    assert view.side_free_at == [[now], [T0 + 0.012]]
    assert view.holds("gpt2", 0, now + 0.006) and not view.holds("gpt2", 0, now + 0.0059)
    # A dispatch queued behind the overdue run starts, and its lane frees, as much later.
    dev.queued = Queued("cold", T0 + 0.003, 2.0, 1.0, False)
    dev.busy_until = T0 + 0.005
    view = View(s, now)
    assert view.free_at[0] == pytest.approx(now + 0.006 + 0.002)
    assert view.holds("cold", 0, now + 0.008) and not view.holds("cold", 0, now + 0.0079)


def test_a_dispatch_queued_behind_an_overdue_run_keeps_how_overdue_it_is():
    """Queued at T0+5 ms behind a run due at T0+3: the queued dispatch's start stays the run's planned end, so
    that a view at T0+8 still counts the run 5 ms overdue (3 past the grace: planned to end at T0+11, the queued
    one 2 ms after)."""
    s = node(1)
    fn(s, "cold", nbytes=100 * MB, exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.003, running="big")
    Scheduler(queue_ahead=True).apply(s, Decision((Dispatch(0, "cold", ("r1",), "host", 2.0, copy_ms=2.0),)),
                                      T0 + 0.005)
    dev = s.devices[0]
    assert dev.queued is not None and dev.queued.start == T0 + 0.003
    assert dev.busy_until == pytest.approx(T0 + 0.005)
    view = View(s, T0 + 0.008)
    assert view.free_at[0] == pytest.approx(T0 + 0.013)
    assert view.holds("big", 0, T0 + 0.01101) and not view.holds("big", 0, T0 + 0.0109)
    assert [(c.start, c.end) for c in view.copies] == [(pytest.approx(T0 + 0.011), pytest.approx(T0 + 0.013))]


def test_a_resident_request_waits_for_a_side_lane_about_to_free_not_behind_a_stalled_piece():
    """Session 31 on two H200s: a piece of a GPT-2 swap expected to take 3 ms took 26. A BERT-base request
    (resident there) came 8.3 ms after the piece was due: planned as if that lane were free, it was queued behind
    the piece and waited out the stall (18.2 ms against a 15.4 ms SLO), while the device's side lane, 0.8 ms
    overdue, freed within a millisecond. Now the overdue lane is planned to go on: the request waits for the side
    lane and runs there once it frees."""
    s = lanes(node(1))
    fn(s, "bert", nbytes=220 * MB, exec_ms={1: 1.7}, slo_ms=15.4)
    dev = s.devices[0]
    dev.resident.add("bert")
    busy(s, 0, until=T0 + 0.004, running="gpt2", copying_until=T0 + 0.003)
    dev.piece = True
    dev.side[0] = SideLane(T0 + 0.0115, "densenet")
    now = T0 + 0.0123
    enqueue(s, "bert", "r1", at=now)
    sched = Scheduler(swap_piece_ms=3.0, queue_ahead=True)
    assert sched.decide(s, now).dispatches == ()  # not behind the piece: the side lane frees first
    dev.release(1, now + 0.0006)
    d = only(sched.decide(s, now + 0.0006))
    assert (d.request_ids, d.lane, d.source) == (("r1",), 1, "resident")


# --- side fetches ---------------------------------------------------------------------------------------

def side_node(fetch_GBps: float | None = 40.0) -> NodeState:
    return lanes(node(1, link=LinkProfile(h2d_GBps=(50.0,), fetch_GBps=fetch_GBps)))


def test_a_side_lane_fetches_a_small_model_rather_than_wait_for_a_long_swap():
    """The first lane swaps "big" until T0+12 ms: a small cold model's request goes to the side lane, which
    brings its 40 MB in (1 ms at 40 GB/s) and runs it, done by T0+2.3 ms instead of after the swap."""
    s = side_node()
    fn(s, "small", nbytes=40 * MB, exec_ms={1: 1.0})
    fn(s, "hot", nbytes=40 * MB, exec_ms={1: 1.0})
    s.devices[0].resident.add("hot")
    s.devices[0].partial["hot2"] = 0.5
    busy(s, 0, until=T0 + 0.012, running="big", copying_until=T0 + 0.012)
    enqueue(s, "small", "r1")
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True, side_fetch=True)
    d = only(sched.decide(s, T0))
    assert (d.function, d.lane, d.source) == ("small", 1, "host")
    assert d.copy_ms == pytest.approx(1.0) and d.expected_ms == pytest.approx(1.0 + 1.0 + 0.3)
    assert set(d.values) == {"hot", "hot2", "big"}  # it may evict: the pool's order comes with it
    sched.apply(s, Decision((d,)), T0)
    dev = s.devices[0]
    assert (dev.side[0].running, dev.side[0].fetching) == ("small", True)
    assert View(s, T0).holds("small", 0, dev.side[0].until) and not View(s, T0).holds("small", 0, T0)
    assert sched.values(s, 0, T0)["small"] == math.inf  # in flight: never evicted under it
    dev.release(1, T0 + 0.0023)
    assert dev.side == [SideLane()]
    # Off, or with no fetch bandwidth measured: it waits behind the swap (queued ahead of the first lane).
    for sched in (Scheduler(swap_piece_ms=0, queue_ahead=True),
                  Scheduler(swap_piece_ms=0, queue_ahead=True, side_fetch=True)):
        s2 = side_node(None if sched.side_fetch else 40.0)
        fn(s2, "small", nbytes=40 * MB, exec_ms={1: 1.0})
        busy(s2, 0, until=T0 + 0.012, running="big", copying_until=T0 + 0.012)
        enqueue(s2, "small", "r1")
        assert (only(sched.decide(s2, T0)).lane, only(sched.decide(s2, T0)).source) == (0, "host")


def test_an_idle_first_lane_swaps_pipelined_rather_than_fetch():
    """Nothing in the way: the first lane's pipelined swap (max(copy, run)) beats the side lane's copy then
    run; a fetch is for when the first lane is taken."""
    s = side_node()
    fn(s, "small", nbytes=40 * MB, exec_ms={1: 1.0})
    enqueue(s, "small", "r1")
    d = only(Scheduler(swap_piece_ms=0, side_fetch=True).decide(s, T0))
    assert (d.lane, d.source) == (0, "host")


def test_no_side_fetch_of_a_model_on_its_way_or_running_elsewhere():
    s = side_node()
    fn(s, "small", nbytes=40 * MB, exec_ms={1: 1.0})
    fn(s, "next", nbytes=40 * MB, exec_ms={1: 1.0})
    busy(s, 0, until=T0 + 0.012, running="small", copying_until=T0 + 0.012)  # its swap is under way
    enqueue(s, "small", "r1")
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True, side_fetch=True)
    d = only(sched.decide(s, T0))
    assert (d.function, d.lane, d.source) == ("small", 0, "resident")  # behind its own swap, not a copy
    # A side fetch in flight: the next request of that model waits for it — for the side lane, which frees
    # (with the model there) long before the first lane does — rather than fetch it again or queue ahead.
    s.queues["small"].requests.clear()
    s.devices[0].running = "big"
    enqueue(s, "next", "r2")
    sched.apply(s, Decision((only(sched.decide(s, T0)),)), T0)
    assert (s.devices[0].side[0].running, s.devices[0].side[0].fetching) == ("next", True)
    enqueue(s, "next", "r3", at=T0 + 0.0005)
    assert View(s, T0).holds("next", 0, s.devices[0].side[0].until)
    assert sched.decide(s, T0 + 0.0005).dispatches == ()
    s.devices[0].release(1, T0 + 0.0023)
    s.devices[0].resident.add("next")  # as the worker reports it
    d = only(sched.decide(s, T0 + 0.0023))
    assert (d.function, d.lane, d.source) == ("next", 1, "resident")


def test_a_resident_model_waits_for_a_busy_side_lane_rather_than_queue_behind_a_swap():
    s = side_node(None)
    fn(s, "hot", nbytes=40 * MB, exec_ms={1: 1.0})
    s.devices[0].resident.add("hot")
    busy(s, 0, until=T0 + 0.012, running="big", copying_until=T0 + 0.012)
    s.devices[0].side[0] = SideLane(T0 + 0.001, "other")
    enqueue(s, "hot", "r1")
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True)
    assert sched.decide(s, T0).dispatches == ()  # the side lane frees in 1 ms, the first lane in 12
    s.devices[0].release(1, T0 + 0.001)
    assert (only(sched.decide(s, T0 + 0.001)).lane) == 1


def test_a_burst_follower_waits_for_its_model_to_land_and_runs_beside_the_swap_queued_behind():
    """Session 29's refusals at N = 800 on two H200s: a vit_b_16 request swaps in on the first lane with a GPT-2
    swap queued behind it (the other device busy longer), and its burst's next request comes 1.2 ms later. The
    model is there once its own run ends, not once the lane frees: the request is admitted, nothing is sent
    while the model is on its way (a side lane never runs what another lane has in flight), and once it has
    landed it runs in the side lane beside the GPT-2 swap, within its SLO."""
    s = lanes(node(2, link=LinkProfile(h2d_GBps=(50.0,), exec_slowdown_copying=1.5, exec_slowdown_beside=(1.3,))))
    fn(s, "vit", nbytes=170 * MB, exec_ms={1: 1.5}, slo_ms=11.5)
    fn(s, "gpt2", nbytes=700 * MB, exec_ms={1: 5.0}, slo_ms=45.0)
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True)
    dev = s.devices[0]
    busy(s, 0, until=T0 + 0.0157, running="vit", copying_until=T0 + 0.0034)
    dev.queued = Queued("gpt2", T0 + 0.0078, 7.9, 14.0, False)
    busy(s, 1, until=T0 + 0.016)
    view = View(s, T0 + 0.0012)
    assert not view.holds("vit", 0, T0 + 0.0077) and view.holds("vit", 0, T0 + 0.0078)
    assert view.holds("gpt2", 0, T0 + 0.0157) and not view.holds("gpt2", 0, T0 + 0.0156)
    r = req(s, "vit", "r2", at=T0 + 0.0012)
    assert sched.admit(s, r, T0 + 0.0012) is None
    assert sched.decide(s, T0 + 0.0012).dispatches == ()
    dev.release(0, T0 + 0.0078)
    dev.resident.add("vit")  # as the worker reports it
    d = only(sched.decide(s, T0 + 0.0078))
    assert (d.function, d.lane, d.source, d.request_ids) == ("vit", 1, "resident", ("r2",))
    assert T0 + 0.0078 + d.expected_ms / 1000.0 <= r.deadline


def test_lanes_are_only_sent_what_they_can_run_through_random_work():
    """Through random bursts, decisions, runs ending (late or early against their estimates) and evictions (two
    devices, two side lanes each, queue-ahead and side fetches on), each side-lane dispatch is one the lane can run
    when the worker gets it: a resident run has its model whole on the device now as the worker last said, not
    merely on its way in another lane, even in a run past its expected end (the engine would refuse it and hand it
    to the first lane, behind the swap it was to avoid); a fetch is of a model no other lane of the device has in
    flight. (The first lane runs anything: it swaps in what is missing.)"""
    import random

    rng = random.Random(11)
    s = lanes(NodeState([DeviceState(i, 2 * GB) for i in range(2)], {}, {},
                        LinkProfile(h2d_GBps=(25.0, 25.0), fetch_GBps=20.0, exec_slowdown_beside=(1.2, 1.4))), 2)
    names = [f"f{i:02d}" for i in range(12)]
    for name in names:
        fn(s, name, nbytes=rng.choice((40 * MB, 170 * MB, 700 * MB)), exec_ms={1: rng.uniform(0.5, 4.0)},
           slo_ms=rng.choice((12.0, 20.0, 45.0)))
    sch = Scheduler(swap_piece_ms=0, queue_ahead=True, side_fetch=True)
    now, running, sent, waited = T0, [], {"side": 0, "fetch": 0, "first": 0}, 0
    for step in range(4000):
        now += rng.uniform(0.0, 0.004)
        op = rng.random()
        if op < 0.45:
            name = rng.choice(names)
            for k in range(rng.choice((1, 1, 2, 3))):  # bursts, as the trace's gamma arrivals bring
                sch.admit(s, Request(f"r{step}.{k}", name, now, now + s.queues[name].slo_ms / 1000.0), now)
        elif op < 0.8 and running:
            device, lane, name, whole = running.pop(rng.randrange(len(running)))
            s.devices[device].release(lane, now)
            if whole or rng.random() < 0.2:  # the reply brings the residency (a resident run's model stays)
                s.devices[device].resident.add(name)
                s.devices[device].partial.pop(name, None)
        else:  # another swap took a model's pages (never one a lane runs)
            d = rng.choice(s.devices)
            gone = [f for f in d.resident if f not in (*d.first_lane, *d.side_running)]
            if gone:
                d.resident.discard(rng.choice(sorted(gone)))
        waiting = {r.id for q in s.queues.values() for r in q.requests}
        decision = sch.decide(s, now)
        for dsp in decision.dispatches:
            dev = s.devices[dsp.device]
            if dsp.lane and dsp.source == "resident":
                assert dsp.function in dev.resident, (step, dsp)
                sent["side"] += 1
            elif dsp.lane:
                assert dsp.function not in (*dev.first_lane, *dev.side_running), (step, dsp)
                sent["fetch"] += 1
            else:
                sent["first"] += 1
        sch.apply(s, decision, now)
        running += [(d.device, d.lane, d.function, d.source != "resident" or d.lane == 0) for d in decision.dispatches]
        gone = {r for d in decision.dispatches for r in d.request_ids} | {r.request_id for r in decision.rejects}
        waited += len(waiting - gone)
    assert min(sent.values()) > 20 and waited > 100, (sent, waited)  # every kind of run, and requests that waited


def test_a_fetch_teaches_the_overhead_of_copy_then_run():
    s = side_node()
    fn(s, "f", nbytes=40 * MB, exec_ms={1: 1.0}, overhead_ms=0.3)
    sched = Scheduler(side_fetch=True)
    # 1 ms copy + 1 ms run + 0.5 ms of overhead observed: the overhead moves toward 0.5, not 1.5.
    sched.observe_completion(s, "f", 0, 1, 2.5, True, 2.5, T0, copy_ms=1.0, fetched=True)
    assert s.profiles["f"].swap_overhead_ms == pytest.approx(0.3 + 0.2 * (0.5 - 0.3))


def test_only_short_copies_are_fetched():
    """A fetch takes the host link from the first lane's copies while it lasts: a model that would take
    longer than FETCH_MAX_MS (3 ms) to fetch waits for the first lane instead."""
    s = side_node()
    fn(s, "large", nbytes=400 * MB, exec_ms={1: 1.0})  # 10 ms at 40 GB/s
    fn(s, "edge", nbytes=120 * MB, exec_ms={1: 1.0})  # 3 ms: still fetched
    busy(s, 0, until=T0 + 0.050, running="big", copying_until=T0 + 0.050)
    sched = Scheduler(swap_piece_ms=0, queue_ahead=True, side_fetch=True)
    assert not sched.may_fetch(s, "large") and sched.may_fetch(s, "edge")
    enqueue(s, "large", "r1")
    d = only(sched.decide(s, T0))
    assert (d.function, d.lane) == ("large", 0)  # queued behind the swap, not fetched beside it
    s.queues["large"].requests.clear()
    enqueue(s, "edge", "r2")
    d = only(sched.decide(s, T0))
    assert (d.function, d.lane, d.source) == ("edge", 1, "host")


def test_settings_a_running_node_may_change():
    s = side_node()
    sched = Scheduler(swap_piece_ms=3.0, queue_ahead=True)
    assert sched.configure(s, {"side_fetch": True, "swap_piece_ms": 0}) == {
        "policy": "swapserve", "queue_ahead": True, "side_fetch": True, "swap_piece_ms": 0.0,
        "queue_ahead_within_ms": None, "peer_copies": False, "side_lanes": None, "place_ahead": False,
        "gateway_margin": False, "spin_ms": 0.0, "slo_values": False}
    assert sched.configure(s, {"queue_ahead_within_ms": 2})["queue_ahead_within_ms"] == 2.0
    assert sched.configure(s, {"queue_ahead_within_ms": None})["queue_ahead_within_ms"] is None
    with pytest.raises(ValueError, match="queue_ahead_within_ms must be"):
        sched.configure(s, {"queue_ahead_within_ms": -1})
    fn(s, "f", nbytes=40 * MB)
    assert sched.may_fetch(s, "f")
    with pytest.raises(ValueError, match="second lane"):
        sched.configure(side_node(None), {"side_fetch": True})
    with pytest.raises(ValueError, match="only under the swapserve policy"):
        Scheduler("fifo_lru").configure(s, {"side_fetch": True})
    with pytest.raises(ValueError, match="swap_piece_ms must be"):
        sched.configure(s, {"side_fetch": False, "swap_piece_ms": True})
    assert sched.side_fetch and sched.swap_piece_ms == 0.0  # all or nothing
    with pytest.raises(ValueError, match="two or more devices"):
        sched.configure(s, {"peer_copies": True})  # no device-to-device bandwidth measured
    s.link = replace(s.link, d2d_GBps=300.0)
    assert sched.configure(s, {"peer_copies": True})["peer_copies"] is True
    with pytest.raises(ValueError, match="peer_copies must be"):
        sched.configure(s, {"peer_copies": 1})
    with pytest.raises(ValueError, match="only under the swapserve policy"):
        Scheduler("fifo_lru").configure(s, {"peer_copies": True})
    assert sched.configure(s, {"side_lanes": 0})["side_lanes"] == 0  # one side lane per device here
    assert sched.configure(s, {"side_lanes": None})["side_lanes"] is None
    assert sched.configure(s, {"place_ahead": True})["place_ahead"] is True
    with pytest.raises(ValueError, match="place_ahead must be true or false"):
        sched.configure(s, {"place_ahead": "yes"})
    with pytest.raises(ValueError, match="only under the swapserve policy"):
        Scheduler("fifo_lru").configure(s, {"place_ahead": True})
    assert sched.configure(s, {"gateway_margin": True})["gateway_margin"] is True
    with pytest.raises(ValueError, match="gateway_margin must be true or false"):
        sched.configure(s, {"gateway_margin": 1})
    with pytest.raises(ValueError, match="only under the swapserve policy"):
        Scheduler("fifo_lru").configure(s, {"gateway_margin": True})
    assert sched.configure(s, {"slo_values": True})["slo_values"] is True
    with pytest.raises(ValueError, match="slo_values must be true or false"):
        sched.configure(s, {"slo_values": "on"})
    with pytest.raises(ValueError, match="only under the swapserve policy"):
        Scheduler("fifo_lru").configure(s, {"slo_values": True})
    assert not Scheduler("fifo_lru", slo_values=True).slo_values
    assert sched.configure(s, {"spin_ms": 1})["spin_ms"] == 1.0
    assert Scheduler("fifo_lru").configure(s, {"spin_ms": 0.5})["spin_ms"] == 0.5  # the loop's, any policy
    for bad in (-1, 1001, True, "1"):
        with pytest.raises(ValueError, match=r"spin_ms must be a number of ms in \[0, 1000\]"):
            sched.configure(s, {"spin_ms": bad})
    with pytest.raises(ValueError, match="spin_ms must be in"):
        Scheduler(spin_ms=-1.0)
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"side_lanes must be null \(all\) or a whole number in \[0, 1\]"):
            sched.configure(s, {"side_lanes": bad})
