"""The swap engine end to end on real artifacts: CPU always, CUDA (eager and graph) where present."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch

from swapserve.config import EngineConfig
from swapserve.engine import PeerSource, Residency, SwapEngine
from swapserve.engine.layout import Layout
from swapserve.errors import (CapacityError, InvalidInputError, NotFoundError, NotResidentError, PoolBusyError,
                              WorkspaceError)



def _cases(modes: list[tuple[str, str]]) -> list[Any]:
    """``(device, mode)`` parameters; those on CUDA marked as GPU tests (skipped without one, selected on the lent
    GPU by ``pytest -m gpu``)."""
    return [pytest.param(d, m, id=f"{d}-{m}", marks=pytest.mark.gpu if d.startswith("cuda") else ()) for d, m in modes]


MODES = [("cpu", "eager"), ("cpu", "ondemand"), ("cuda:0", "eager"), ("cuda:0", "graph"), ("cuda:0", "ondemand")]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_swapped_run_is_bit_identical_to_resident(make_artifact, make_engine, device, mode, kind):
    art, module, x = make_artifact(kind)
    eng = make_engine(device, mode)
    eng.add("m", art)
    assert eng.residency("m") is Residency.ABSENT
    cold = eng.infer("m", x)
    assert eng.residency("m") is Residency.RESIDENT
    warm = eng.infer("m", x)
    eng.evict("m")
    assert eng.residency("m") is Residency.ABSENT
    cold_again = eng.infer("m", x)
    assert same(cold, warm) and same(cold_again, warm)
    with torch.no_grad():
        ref = module(*x)
    torch.testing.assert_close(warm[0].cpu(), ref, rtol=1e-4, atol=1e-4)
    assert eng.stats.swaps == 2 and eng.stats.resident_runs == 1


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_partial_eviction_copies_only_missing_pages(make_artifact, make_engine, device, mode):
    a, _, xa = make_artifact("mlp", seed=1, name="a")
    b, _, xb = make_artifact("mlp", seed=2, name="b")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)  # 6 pages; each model needs 4
    eng.add("a", a)
    eng.add("b", b)
    ref_a = eng.infer("a", xa)
    assert eng.placement("a").valid_count == 4
    eng.infer("b", xb)
    assert eng.residency("a") is Residency.PARTIAL
    assert eng.placement("a").valid == [True, True, False, False]  # the tail went first
    eng.pool.check()
    copied = eng.stats.bytes_copied
    again = eng.infer("a", xa)
    assert same(again, ref_a)
    page = eng.config.page_bytes
    assert eng.stats.bytes_copied - copied == eng._models["a"].layout.nbytes - 2 * page
    assert eng.residency("a") is Residency.RESIDENT


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_prefetched_head_then_run(make_artifact, make_engine, device, mode):
    art, _, x = make_artifact("mlp")
    eng = make_engine(device, mode)
    eng.add("m", art)
    ref = eng.infer("m", x)
    eng.evict("m")
    eng.prefetch("m", max_bytes=2 << 20)  # the first page only: a load cut short
    assert eng.residency("m") is Residency.PARTIAL
    assert eng.placement("m").valid == [True, False, False, False]
    assert same(eng.infer("m", x), ref)


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_token_ids_past_the_vocabulary_are_refused_before_they_run(make_artifact, make_engine, device, mode):
    art, _, (ids,) = make_artifact("tied")
    assert art.manifest.inputs[0].index_bound == 4096
    eng = make_engine(device, mode, pool_mib=64)
    eng.add("m", art)
    ref = eng.infer("m", (ids,))
    for bad in (4096, -1):
        with pytest.raises(InvalidInputError, match=r"\[0, 4096\)"):
            eng.infer("m", (torch.full_like(ids, bad),))
    assert same(eng.infer("m", (ids,)), ref)  # and the device goes on serving


def test_last_run_says_where_a_run_went(make_artifact, make_engine):
    art, _, x = make_artifact("mlp")
    eng = make_engine("cpu", "eager")
    eng.add("m", art)
    t = time.perf_counter()
    eng.infer("m", x)
    wall = (time.perf_counter() - t) * 1e3
    run = eng.last_run()
    parts = (run.wait_ms, run.upload_ms, run.place_ms, run.device_ms)
    assert run.swapped and all(p >= 0 for p in parts) and run.device_ms > 0 and sum(parts) <= wall
    eng.infer("m", x)
    assert not eng.last_run().swapped and eng.last_run().device_ms > 0


def test_last_run_counts_the_models_it_evicted(make_artifact, make_engine):
    """``evicted`` (what ``swapserve_evictions_total`` adds up) is models a run took pages from, not pages."""
    a, _, xa = make_artifact("mlp", seed=1, name="a")
    b, _, xb = make_artifact("mlp", seed=2, name="b")
    eng = make_engine("cpu", "eager", pool_mib=8, page_mib=2)  # not both at once
    eng.add("a", a)
    eng.add("b", b)
    eng.infer("a", xa)
    assert eng.last_run().swapped and eng.last_run().evicted == 0  # a free pool
    pages = eng.stats.pages_taken
    eng.infer("b", xb)
    assert eng.last_run().evicted == 1 and eng.stats.pages_taken - pages > 1  # several of a's pages, one model
    eng.infer("b", xb)
    assert not eng.last_run().swapped and eng.last_run().evicted == 0


def test_a_piece_of_a_swap_is_whole_pages_of_what_is_missing(make_artifact, make_engine):
    art, _, x = make_artifact("mlp")
    eng = make_engine("cpu", "eager")
    eng.add("m", art)
    ref = eng.infer("m", x)
    eng.evict("m")
    eng.prefetch("m", max_bytes=1)  # rounded up: one page
    assert eng.placement("m").valid == [True, False, False, False]
    eng.prefetch("m", max_bytes=(2 << 20) + 1)  # the next two missing pages, not the first ones again
    assert eng.placement("m").valid == [True, True, True, False]
    assert same(eng.infer("m", x), ref)


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_concurrent_swaps_do_not_corrupt_each_other(make_artifact, make_engine, device, mode):
    a, _, xa = make_artifact("mlp", seed=1, name="a")
    b, _, xb = make_artifact("tied", seed=2, name="b")
    eng = make_engine(device, mode, pool_mib=8, page_mib=2)  # not both at once: every run swaps
    eng.add("a", a)
    eng.add("b", b)
    ref = {"a": eng.infer("a", xa), "b": eng.infer("b", xb)}
    errors: list[str] = []

    def worker(name: str, x: tuple[torch.Tensor, ...]) -> None:
        for _ in range(15):
            if not same(eng.infer(name, x), ref[name]):
                errors.append(name)

    threads = [threading.Thread(target=worker, args=(n, x)) for n, x in (("a", xa), ("b", xb)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    eng.pool.check()
    assert eng.stats.pages_taken > 0 and eng.stats.remaps > 0


def unmaps_done(eng: SwapEngine) -> None:
    """Wait for the engine's unmapping of stale slots queued so far (one thread, in order)."""
    if eng._unmapper is not None:
        eng._unmapper.submit(lambda: None).result(10)


def mapped_elsewhere(eng: SwapEngine) -> list[tuple[str, int]]:
    """(model, slot) pairs whose slot maps a page another model owns."""
    pool = eng.pool
    return [(m, i) for m, p in pool.placements.items() for i, pg in enumerate(p.slots)
            if pg is not None and pool.owner[pg] not in (None, (m, i))]


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_slots_whose_pages_were_taken_are_unmapped_off_the_request_path(make_artifact, make_engine, device, mode):
    """A model whose pages another took has those slots unmapped by the engine's own thread, so that the device
    maps about the pool's pages rather than every model's every slot, and the model's return maps its slots
    without unmapping first (a third of a placement's driver calls)."""
    arts = {n: make_artifact(kind, seed=40 + i, name=n) for i, (n, kind) in enumerate(
        (("a", "mlp"), ("b", "tied"), ("c", "mlp")))}
    eng = make_engine(device, mode, pool_mib=8, page_mib=2)  # 4 pages, models of 4: every run swaps
    for n, (art, _, _) in arts.items():
        eng.add(n, art)
    ref = {n: eng.infer(n, x) for n, (_, _, x) in arts.items()}
    unmaps_done(eng)
    assert eng.stats.unmapped_behind > 0 and mapped_elsewhere(eng) == []
    unmap, on_path = eng.backend.unmap, []

    def counted_unmap(va: int) -> None:
        if not threading.current_thread().name.startswith("swapserve-unmapper"):
            on_path.append(va)
        unmap(va)

    eng.backend.unmap = counted_unmap  # type: ignore[method-assign]
    remaps = eng.stats.remaps
    for _ in range(3):
        for n, (_, _, x) in arts.items():
            assert same(eng.infer(n, x), ref[n])
            run = eng.last_run()
            assert run.remaps > 0 and run.remap_unmaps == 0  # slots move; none still mapped a page
            unmaps_done(eng)
            assert mapped_elsewhere(eng) == []
    assert eng.stats.remaps > remaps and on_path == []
    eng.pool.check()


def test_a_run_says_how_many_of_its_remaps_unmapped_a_page_first(make_artifact, make_engine):
    """``RunInfo.remaps`` and ``remap_unmaps`` (the metrics ``swapserve_remaps_total`` and
    ``swapserve_remap_unmaps_total``): without the unmapper, a model whose pages were taken, and cannot take
    them back (their holder is pinned), unmaps each slot on its way back before mapping another page."""
    a, _, xa = make_artifact("mlp", seed=70, name="a")  # 4 pages
    b, _, xb = make_artifact("tied", seed=71, name="b")  # 3 pages
    c, _, xc = make_artifact("tied", seed=72, name="c")
    eng = make_engine("cpu", "eager", pool_mib=14, page_mib=2)  # 7 pages
    eng._unmap_idle = lambda: None  # type: ignore[method-assign]  # stale slots stay mapped
    for n, art in (("a", a), ("b", b), ("c", c)):
        eng.add(n, art)
    ref = eng.infer("a", xa)
    eng.infer("b", xb)  # the 3 free pages
    eng.infer("c", xc)  # a's last 3 pages
    assert eng.lend("c") is not None  # pinned: a cannot take them back
    try:
        assert same(eng.infer("a", xa), ref)  # b's pages instead
    finally:
        eng.unlend("c")
    run = eng.last_run()
    assert run.remaps == 3 and run.remap_unmaps == 3


def test_stale_slots_are_unmapped_only_while_nothing_is_placed_or_run(make_artifact, make_engine):
    """Unmapping beside a placement slowed its remaps (driver calls wait on each other): the unmapper leaves the
    stale slots mapped while a run is in progress, and unmaps them once the device is idle."""
    arts = {n: make_artifact("mlp", seed=60 + i, name=n) for i, n in enumerate("abc")}
    eng = make_engine("cpu", "eager", pool_mib=8, page_mib=2)  # 4 pages, models of 4: every run swaps
    for n, (art, _, _) in arts.items():
        eng.add(n, art)
    ref = {n: eng.infer(n, x) for n, (_, _, x) in arts.items()}  # a, b, c: c holds the pages
    unmaps_done(eng)
    launched, go_on = threading.Event(), threading.Event()

    def held(_outs: list[torch.Tensor]) -> None:
        launched.set()
        go_on.wait(10)

    outs: dict[str, list[torch.Tensor]] = {}
    run = threading.Thread(target=lambda: outs.update(a=eng.infer("a", arts["a"][2], output=held)))
    run.start()  # a takes c's pages: c's slots are stale while a runs
    try:
        assert launched.wait(10)
        eng._unmap_idle()  # as a job queued by an earlier run's end would, now
        assert "c" in eng._stale and mapped_elsewhere(eng) == [("c", i) for i in range(4)]
    finally:
        go_on.set()
        run.join(10)
    unmaps_done(eng)
    assert same(outs["a"], ref["a"]) and mapped_elsewhere(eng) == [] and not eng._stale


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_a_placement_waits_for_its_models_stale_slots_to_be_unmapped(make_artifact, make_engine, device, mode):
    """A model whose stale slots are being unmapped is placed meanwhile: the placement maps its slots only
    once the unmapping is over (mapping onto a mapped address fails, on CUDA as on the CPU backend), and the
    run gives the same bits."""
    a, _, xa = make_artifact("mlp", seed=51, name="a")
    b, _, xb = make_artifact("tied", seed=52, name="b")
    eng = make_engine(device, mode, pool_mib=8, page_mib=2)  # 4 pages, models of 4: every run swaps
    eng.add("a", a)
    eng.add("b", b)
    ref = {"a": eng.infer("a", xa), "b": eng.infer("b", xb)}
    assert same(eng.infer("a", xa), ref["a"])  # a holds every page again, b's slots are unmapped
    unmaps_done(eng)
    unmapping, go_on = threading.Event(), threading.Event()
    unmap = eng.backend.unmap

    def slow_unmap(va: int) -> None:
        if threading.current_thread().name.startswith("swapserve-unmapper"):
            unmapping.set()
            go_on.wait(10)
        unmap(va)

    eng.backend.unmap = slow_unmap  # type: ignore[method-assign]
    outs: dict[str, list[torch.Tensor]] = {}
    try:
        assert same(eng.infer("b", xb), ref["b"])  # takes a's pages: a's slots go to the (slow) unmapper
        assert unmapping.wait(10), "nothing was unmapped behind: the test's premise is gone"
        run = threading.Thread(target=lambda: outs.update(a=eng.infer("a", xa)))
        run.start()
        run.join(0.3)
        assert run.is_alive(), "the placement went on while the model's slots were being unmapped"
    finally:
        go_on.set()
    run.join(10)
    assert same(outs["a"], ref["a"]) and same(eng.infer("b", xb), ref["b"])
    unmaps_done(eng)
    eng.pool.check()


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
@pytest.mark.parametrize("lanes", [1, 2, 4])
def test_every_lane_gives_the_same_bits(make_artifact, make_engine, device, mode, lanes):
    art, _, x = make_artifact("mlp", seed=3)
    eng = make_engine(device, mode, lanes=lanes)
    eng.add("m", art)
    cold = eng.infer("m", x)  # swapped in (lane 0)
    runs = [eng.infer("m", x, lane=lane) for lane in range(lanes) for _ in range(2)]
    assert all(same(r, cold) for r in runs)
    with pytest.raises(ValueError, match=f"lane {lanes}"):
        eng.infer("m", x, lane=lanes)


def test_lanes_are_one_to_four():
    with pytest.raises(ValueError, match="lanes must be 1 to 4"):
        EngineConfig(lanes=5)
    with pytest.raises(ValueError, match="lanes must be 1 to 4"):
        EngineConfig(lanes=0)


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_side_lane_runs_resident_models_only(make_artifact, make_engine, device, mode):
    art, _, x = make_artifact("tied", seed=4)
    eng = make_engine(device, mode)
    eng.add("m", art)
    with pytest.raises(NotResidentError):
        eng.infer("m", x, lane=1)  # never loaded: only lane 0 swaps
    ref = eng.infer("m", x)
    eng.evict("m")
    with pytest.raises(NotResidentError):
        eng.infer("m", x, lane=1)
    assert eng.residency("m") is Residency.ABSENT  # the refusal changed nothing
    eng.pool.check()
    assert same(eng.infer("m", x), ref)
    assert same(eng.infer("m", x, lane=1), ref)


class _WithEmpty(torch.nn.Module):
    """A model with an empty tensor among its weights (GPT-2 has some)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.register_buffer("empty", torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.empty.sum()


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_a_model_with_an_empty_weight_loads_and_swaps(make_engine, device, mode, tmp_path):
    from swapserve.artifact import build_artifact, load_artifact

    torch.manual_seed(11)
    x = torch.randn(1, 64)
    build_artifact(_WithEmpty().eval(), (x,), tmp_path / "empty", name="empty")
    art = load_artifact(tmp_path / "empty")
    assert any(t.nbytes == 0 for t in Layout.of(art.manifest, 256).slots), "the empty buffer is a weight"
    eng = make_engine(device, mode)
    eng.add("m", art)
    cold = eng.infer("m", [x])
    eng.evict("m")
    assert same(eng.infer("m", [x]), cold) and same(eng.infer("m", [x], lane=1), cold)


FETCH_MODES = [(d, m) for d, m in MODES if m != "ondemand"]  # the baseline never fetches (no pinned buffers)


@pytest.mark.parametrize(("device", "mode"), _cases(FETCH_MODES))
def test_a_side_lane_fetch_brings_a_model_in_and_gives_the_same_bits(make_artifact, make_engine, device, mode):
    a, _, xa = make_artifact("tied", seed=8, name="a")
    b, _, xb = make_artifact("mlp", seed=9, name="b")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)  # 6 pages: a (4) and b (4) do not both fit
    eng.add("a", a)
    eng.add("b", b)
    ref = {"a": eng.infer("a", xa), "b": eng.infer("b", xb)}  # lane 0 swaps (b evicts part of a)
    assert eng.residency("a") is Residency.PARTIAL
    copied = eng.stats.bytes_copied
    out = eng.infer("a", xa, lane=1, fetch=True)  # the missing part of a, by the side lane
    assert same(out, ref["a"])
    assert eng.residency("a") is Residency.RESIDENT and eng.last_run().swapped
    assert eng.stats.bytes_copied - copied == eng.last_run().bytes_copied > 0
    eng.evict("b")
    eng.evict("a")
    assert same(eng.infer("a", xa, lane=1, fetch=True), ref["a"])  # all of it
    assert same(eng.infer("a", xa, lane=1), ref["a"]) and not eng.last_run().swapped  # now a resident run
    assert same(eng.infer("b", xb, lane=1, fetch=True), ref["b"])  # evicting a's tail, as lane 0 would
    assert eng.residency("a") is Residency.PARTIAL
    eng.pool.check()


@pytest.mark.parametrize(("device", "mode"), _cases(FETCH_MODES))
def test_a_side_lane_fetch_refuses_a_model_in_flight_in_lane_0(make_artifact, make_engine, device, mode):
    art, _, x = make_artifact("mlp", seed=10)
    eng = make_engine(device, mode)
    eng.add("m", art)
    ref = eng.infer("m", x)
    eng.evict("m")
    with eng._placed(eng._models["m"], None):  # what lane 0 holds while it swaps m in
        with pytest.raises(NotResidentError, match="on its way"):
            eng.infer("m", x, lane=1, fetch=True)
    assert eng.residency("m") is Residency.ABSENT
    eng.pool.check()
    assert same(eng.infer("m", x, lane=1, fetch=True), ref)


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
@pytest.mark.parametrize("lanes", [2, 3])
def test_side_lanes_run_while_lane_0_swaps(make_artifact, make_engine, device, mode, lanes):
    """Every side lane serves a resident model over and over (with three lanes, two of them at once, each
    its own model) while lane 0 swaps two others in and out of a pool too small for both: every answer is
    the resident one's, and the resident models are never evicted under them."""
    hot, _, xh = make_artifact("mlp", seed=5, name="hot")
    warm, _, xw = make_artifact("mlp", seed=12, name="warm")
    b, _, xb = make_artifact("tied", seed=6, name="b")
    c, _, xc = make_artifact("mlp", seed=7, name="c")
    # hot + warm + one of b, c (4 + 4 + 4 or 3 of 12 pages)
    eng = make_engine(device, mode, pool_mib=24, page_mib=2, lanes=lanes)
    for name, art in (("hot", hot), ("warm", warm), ("b", b), ("c", c)):
        eng.add(name, art)
    ref = {"b": eng.infer("b", xb), "c": eng.infer("c", xc), "hot": eng.infer("hot", xh),
           "warm": eng.infer("warm", xw)}

    def keep(p: Any) -> tuple[float, float]:  # the scheduler's job
        return (float("inf") if p.model in ("hot", "warm") else 0.0, p.last_used)

    errors: list[str] = []
    done = threading.Event()
    sides = [(lane, *(("hot", xh) if lane % 2 else ("warm", xw))) for lane in range(1, lanes)]

    def side(lane: int, name: str, x: tuple[torch.Tensor, ...]) -> None:
        while not done.is_set():
            if not same(eng.infer(name, x, lane=lane), ref[name]):
                errors.append(name)

    threads = [threading.Thread(target=side, args=a) for a in sides]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            for name, x in (("b", xb), ("c", xc)):
                if not same(eng.infer(name, x, value=keep), ref[name]):
                    errors.append(name)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors
    assert eng.residency("warm") is Residency.RESIDENT
    assert eng.residency("hot") is Residency.RESIDENT
    assert eng.stats.swaps >= 20
    eng.pool.check()


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_dynamic_batch(make_artifact, make_engine, device, mode):
    art, module, x = make_artifact("mlp", max_batch=4)
    eng = make_engine(device, mode)
    eng.add("m", art)
    xb = torch.randn(3, 512)
    out = eng.infer("m", (xb,))
    with torch.no_grad():
        torch.testing.assert_close(out[0].cpu(), module(xb), rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidInputError, match="batch ≤ 4"):
        eng.infer("m", (torch.randn(5, 512),))


@pytest.mark.parametrize(("device", "mode"), _cases(MODES))
def test_outputs_copied_out_with_the_run_land_with_it(make_artifact, make_engine, device, mode):
    """``infer(output=...)`` gets the request's rows (not the padded bucket's) right after the launch; copies it
    enqueues non-blocking into pinned host memory have landed when ``infer`` returns, swapped or resident; what it
    raises comes after the run, and the engine goes on."""
    art, _module, _x = make_artifact("mlp", max_batch=4)
    eng = make_engine(device, mode)
    eng.add("m", art)
    xb = torch.randn(3, 512)
    for _ in range(2):  # swapped in, then resident
        host: list[list[torch.Tensor]] = []

        def into_host(outs: list[torch.Tensor]) -> None:
            assert [o.shape[0] for o in outs] == [3]
            dst = [torch.empty(o.shape, dtype=o.dtype, pin_memory=o.is_cuda) for o in outs]
            for d, o in zip(dst, outs):
                d.copy_(o, non_blocking=True)
            host.append(dst)

        outs = eng.infer("m", (xb,), output=into_host)
        assert len(host) == 1 and same(host[0], outs)

    def broken(outs: list[torch.Tensor]) -> None:
        raise RuntimeError("no room for the outputs")

    with pytest.raises(RuntimeError, match="no room"):
        eng.infer("m", (xb,), output=broken)
    assert same(eng.infer("m", (xb,)), outs)


def test_bad_inputs_get_clear_errors(make_artifact, make_engine):
    art, _, x = make_artifact("mlp")
    eng = make_engine()
    eng.add("m", art)
    with pytest.raises(InvalidInputError, match="takes 1 inputs"):
        eng.infer("m", [])
    with pytest.raises(InvalidInputError, match="must be float32, got float64"):
        eng.infer("m", (torch.randn(1, 512, dtype=torch.float64),))
    with pytest.raises(InvalidInputError, match=r"must have shape \[batch, 512\]"):
        eng.infer("m", (torch.randn(1, 500),))
    with pytest.raises(NotFoundError):
        eng.infer("nope", x)
    assert eng.residency("m") is Residency.ABSENT  # nothing moved
    eng.infer("m", x)


def test_model_larger_than_pool_leaves_nothing_behind(make_artifact, make_engine):
    art, _, _ = make_artifact("mlp")
    eng = make_engine(pool_mib=4, page_mib=2)
    with pytest.raises(CapacityError, match="needs 4 pages"):
        eng.add("m", art)
    assert eng.models() == [] and not eng.pool.placements and not eng.store.has("m")


def test_workspace_smaller_than_activations(make_artifact, make_engine):
    art, _, x = make_artifact("mlp", max_batch=4)
    probe = make_engine()
    probe.add("m", art)
    need1, need4 = probe.activation_bytes("m", 1), probe.activation_bytes("m", 4)
    assert 0 < need1 < need4
    eng = make_engine(workspace_bytes=(need1 + need4) // 2)
    eng.add("m", art)
    eng.infer("m", x)
    with pytest.raises(WorkspaceError, match="raise workspace_bytes"):
        eng.infer("m", (torch.randn(4, 512),))
    eng.infer("m", x)  # still serving


def test_host_store_spills_and_reloads(make_artifact, make_engine):
    a, _, xa = make_artifact("mlp", seed=1, name="a")
    b, _, xb = make_artifact("mlp", seed=2, name="b")
    eng = make_engine(store_mib=8)  # one model at a time in host memory
    eng.add("a", a)
    ref = eng.infer("a", xa)
    eng.add("b", b)  # spills a
    from swapserve.engine import HostState

    assert eng.store.get("a").state is HostState.DISK
    eng.evict("a")
    assert same(eng.infer("a", xa), ref)  # back from its safetensors file
    assert eng.store.get("a").loads == 2


def test_a_swap_waits_for_a_side_lane_run_to_unpin_the_pages_it_needs(make_artifact, make_engine, monkeypatch):
    """A pool that holds one of two models; lane 1 is running the resident one (pinned) when lane 0 must swap the
    other in over it: the swap waits for that run to end instead of failing, and fails (PoolBusyError, a 503 to
    the client) only if the run outlasts PLACE_WAIT_S."""
    from swapserve.engine import engine as engine_mod
    from swapserve.errors import PoolBusyError

    a, _, xa = make_artifact("mlp", seed=8, name="a")
    b, _, xb = make_artifact("mlp", seed=9, name="b")
    eng = make_engine("cpu", pool_mib=8, page_mib=2)  # one mlp's pages
    eng.add("a", a)
    eng.add("b", b)
    ref_b = eng.infer("b", xb)
    eng.infer("a", xa)  # a resident, b evicted

    def side_run(seconds: float, started: threading.Event) -> None:
        with eng._placed(eng._models["a"], None, lane=1):  # what a side-lane run of a holds while it runs
            started.set()
            time.sleep(seconds)

    started = threading.Event()
    t = threading.Thread(target=side_run, args=(0.3, started))
    t.start()
    started.wait()
    t0 = time.monotonic()
    assert same(eng.infer("b", xb), ref_b)
    assert time.monotonic() - t0 >= 0.2  # it waited for the side lane's run
    t.join()
    eng.pool.check()

    eng.infer("a", xa)
    monkeypatch.setattr(engine_mod, "PLACE_WAIT_S", 0.05)
    started = threading.Event()
    t = threading.Thread(target=side_run, args=(0.5, started))
    t.start()
    started.wait()
    with pytest.raises(PoolBusyError):
        eng.infer("b", xb)
    t.join()
    assert same(eng.infer("b", xb), ref_b)  # nothing was left half done
    eng.pool.check()


def _map_pages(borrower: SwapEngine, lender: SwapEngine) -> None:
    """The borrower maps the lender's pages as peer 0 (as a worker does at start)."""
    fds = lender.backend.export_pages()
    try:
        borrower.backend.import_peer(0, fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_run_copies_its_model_from_a_lending_peer_and_gives_the_same_bits(make_artifact, make_engine):
    """Two CPU engines, as two workers: the borrower maps the lender's pages (its pool's descriptor), the lender
    lends a resident model (pinned, its pages named), and the borrower's runs copy it from there — in either
    lane, whole or only what is missing — answering bit for bit as the lender's resident run."""
    art, _, x = make_artifact("tied", seed=11)
    lender = make_engine("cpu", pool_mib=12, page_mib=2)  # the model is 4 pages: several pages, in order
    borrower = make_engine("cpu", pool_mib=12, page_mib=2, store=lender.store)
    _map_pages(borrower, lender)
    lender.add("m", art)
    borrower.add("m", art)
    assert lender.lend("m") is None  # not on the lender yet: nothing pinned
    ref = lender.infer("m", x)
    pages = lender.lend("m")
    assert pages is not None and len(pages) == lender.placement("m").n_slots
    with pytest.raises(PoolBusyError):
        lender.evict("m")  # lent: its pages stay as they are

    out = borrower.infer("m", x, peer=PeerSource(0, pages))
    assert same(out, ref)
    assert borrower.residency("m") is Residency.RESIDENT
    run = borrower.last_run()
    assert run.swapped and run.from_peer and run.bytes_copied == borrower._models["m"].layout.nbytes
    assert same(borrower.infer("m", x, peer=PeerSource(0, pages)), ref)
    assert not borrower.last_run().from_peer  # resident now: nothing copied
    borrower.evict("m")
    assert same(borrower.infer("m", x, lane=1, peer=PeerSource(0, pages)), ref)  # a side lane copies from it too
    b, _, xb = make_artifact("mlp", seed=12, name="b")
    borrower.add("b", b)
    borrower.infer("b", xb)  # takes the tail of m (6 pages, 4 each)
    assert borrower.residency("m") is Residency.PARTIAL
    copied = borrower.stats.bytes_copied
    assert same(borrower.infer("m", x, peer=PeerSource(0, pages)), ref)  # only the tail comes
    assert borrower.stats.bytes_copied - copied == borrower.last_run().bytes_copied
    assert 0 < borrower.last_run().bytes_copied < borrower._models["m"].layout.nbytes

    # The lender's worker dies and a new one shares its pages: the borrower unmaps the old ones (a run sent to
    # copy from them before that was known copies from host instead), maps the new ones, and copies from there.
    for lane in (0, 1):
        borrower.evict("m")
        borrower.drop_peer(0)
        assert not borrower.backend.has_peer(0)
        assert same(borrower.infer("m", x, lane=lane, peer=PeerSource(0, pages)), ref)
        run = borrower.last_run()
        assert run.swapped and not run.from_peer and run.bytes_copied == borrower._models["m"].layout.nbytes
        borrower.drop_peer(0)  # nothing mapped: nothing to do
        _map_pages(borrower, lender)
        borrower.evict("m")
        assert same(borrower.infer("m", x, lane=lane, peer=PeerSource(0, pages)), ref)
        assert borrower.last_run().from_peer

    lender.unlend("m")
    lender.evict("m")
    assert lender.residency("m") is Residency.ABSENT
    lender.pool.check()
    borrower.pool.check()


# --- placing ahead ------------------------------------------------------------------------------------------

AHEAD_MODES = [(d, m) for d, m in MODES if m != "ondemand"]  # the baseline places nothing ahead


@pytest.mark.parametrize(("device", "mode"), _cases(AHEAD_MODES))
def test_pages_placed_while_the_run_before_executes_give_the_same_bits(make_artifact, make_engine, device, mode):
    """Lane 0 swaps a and b in turn through a pool that holds one of them; once each run is launched, the next
    one's pages are placed (as the worker does for the run right behind) — evicting the other model's pages
    once the launched run lets them go, never before: pinned. The next run finds them there, and copies and
    computes exactly as one that placed them itself."""
    a, _, xa = make_artifact("mlp", seed=21, name="a")
    b, _, xb = make_artifact("tied", seed=22, name="b")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)  # 6 pages: a (4) and b (4) do not both fit
    eng.add("a", a)
    eng.add("b", b)
    ref = {"a": eng.infer("a", xa), "b": eng.infer("b", xb)}
    order = [("a", xa), ("b", xb)] * 5
    launched = []

    def place_next(i: int) -> None:
        launched.append(i)
        if i + 1 < len(order):
            eng.place_ahead(order[i + 1][0], None, ticket=i + 1)

    for i, (name, x) in enumerate(order):
        out = eng.infer(name, x, ticket=i, launched=lambda i=i: place_next(i))
        assert same(out, ref[name]), (i, name)
        run = eng.last_run()
        assert run.swapped and run.placed_ahead == (i > 0), (i, run)
        assert run.bytes_copied > 0  # copied ahead or not, the run's swap counts what was copied
        assert run.place_remap_ms == 0.0 or i == 0
    assert launched == list(range(len(order)))
    assert eng.stats.placed_ahead == len(order) - 1
    assert all(not p.pins for p in eng.pool.placements.values())  # every pin let go
    eng.pool.check()


@pytest.mark.parametrize(("device", "mode"), _cases(AHEAD_MODES))
def test_a_run_behind_its_own_models_swap_is_not_placed_ahead(make_artifact, make_engine, device, mode):
    """Two runs of one model back to back in lane 0 (a burst's follower sent behind its leader's swap): the
    leader's copies bring the model in, so placing the follower ahead would copy it a second time, behind the
    first, and the follower would wait for all of it (on an H200, vgg19's follower ran 5.7 ms against 1.6 ms
    resident). It is not placed ahead: it finds the model there and runs as a resident model does."""
    a, _, xa = make_artifact("mlp", seed=29, name="a")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)
    eng.add("a", a)
    ref = eng.infer("a", xa)
    eng.evict("a")
    out = eng.infer("a", xa, ticket=0, launched=lambda: eng.place_ahead("a", None, ticket=1))
    leader = eng.last_run()
    assert same(out, ref) and leader.swapped and leader.bytes_copied > 0
    assert same(eng.infer("a", xa, ticket=1), ref)
    follower = eng.last_run()
    assert not follower.swapped and follower.bytes_copied == 0 and not follower.placed_ahead, follower
    assert eng.stats.placed_ahead == 0 and eng._models["a"].ahead is None
    assert not eng.pool.placements["a"].pins
    eng.pool.check()


@pytest.mark.parametrize(("device", "mode"), _cases(AHEAD_MODES))
def test_a_model_a_side_lane_is_still_remapping_is_neither_placed_ahead_nor_copied_into(make_artifact, make_engine,
                                                                                        device, mode):
    """A side lane fetches a model and is still remapping its slots when lane 0's next run of it is placed ahead
    and then comes (session 19's trace on an H200: a resnet50's fetch remapped for 1.06 ms while its other
    request was queued ahead in lane 0). Nothing is placed ahead for it, and lane 0's run, which finds the slots
    already claimed for the model, waits for those remaps before it copies or runs: before, it copied into
    slots still mapping pages that were no longer the model's — a segfault on the CPU backend, and most likely
    that trace's ``unspecified launch failure``, which ended the worker's CUDA context."""
    a, _, xa = make_artifact("mlp", seed=31, name="a")
    b, _, xb = make_artifact("tied", seed=32, name="b")
    c, _, xc = make_artifact("mlp", seed=33, name="c")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)  # 6 pages: a (4), b (4), c (4)
    for name, art in (("a", a), ("b", b), ("c", c)):
        eng.add(name, art)
    ref = {"a": eng.infer("a", xa), "b": eng.infer("b", xb), "c": eng.infer("c", xc)}
    # b and c hold a's pages now: bringing a back maps its slots onto others.
    remapping, go_on = threading.Event(), threading.Event()
    map_page = eng.backend.map

    def slow_map(va: int, page: int) -> None:
        if threading.current_thread().name == "fetch":
            remapping.set()
            go_on.wait(10)
        map_page(va, page)

    eng.backend.map = slow_map  # type: ignore[method-assign]
    outs: dict[str, list[torch.Tensor]] = {}
    fetch = threading.Thread(name="fetch", target=lambda: outs.update(fetch=eng.infer("a", xa, lane=1, fetch=True)))
    fetch.start()
    try:
        assert remapping.wait(10), "the fetch remapped nothing: the test's premise is gone"
        eng.place_ahead("a", None, ticket=1)
        lane0 = threading.Thread(target=lambda: outs.update(lane0=eng.infer("a", xa, ticket=1)))
        lane0.start()
        lane0.join(0.3)
        assert lane0.is_alive(), "lane 0's run went on while the side lane was remapping its model's slots"
    finally:
        go_on.set()
        fetch.join(10)
    lane0.join(10)
    assert same(outs["fetch"], ref["a"]) and same(outs["lane0"], ref["a"])
    assert eng.stats.placed_ahead == 0 and eng._models["a"].ahead is None
    assert all(not p.pins for p in eng.pool.placements.values())
    eng.pool.check()
    assert same(eng.infer("b", xb), ref["b"]) and same(eng.infer("c", xc), ref["c"])


@pytest.mark.parametrize(("device", "mode"), _cases(AHEAD_MODES))
def test_lane_0_placing_ahead_beside_a_fetching_side_lane_gives_the_same_bits(make_artifact, make_engine, device,
                                                                              mode):
    """The worker's protocol under stress: lane 0 swaps a random sequence of five models through a pool that holds
    one and a half; once each run is launched, another thread places the next one ahead after a random delay
    (before lane 0 may start it, as the worker's receiver does), while a side lane fetches random models. Every
    answer is the resident one's and every pin is let go. Before the remap wait (the test above), the same on the
    CPU backend segfaulted or answered wrong bits within a thousand runs, in each of three seeds."""
    import queue
    import random

    models = {f"m{i}": make_artifact(kind, seed=40 + i, name=f"m{i}")
              for i, kind in enumerate(("mlp", "tied", "mlp", "tied", "mlp"))}
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)
    for name, (art, _, _) in models.items():
        eng.add(name, art)
    ref = {name: eng.infer(name, x) for name, (_, _, x) in models.items()}
    rng = random.Random(1)
    order = [rng.choice(sorted(models)) for _ in range(600)]
    errors: list[Any] = []
    launches: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    placed, stop = threading.Event(), threading.Event()
    placed.set()

    def lane0() -> None:
        try:
            for i, name in enumerate(order):
                placed.wait()
                placed.clear()
                if not same(eng.infer(name, models[name][2], ticket=i, launched=lambda i=i: launches.put(i)),
                            ref[name]):
                    errors.append(("lane 0", i, name))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(("lane 0", e))
        finally:
            stop.set()
            launches.put(None)

    def receiver() -> None:
        delays = random.Random(2)
        while (i := launches.get()) is not None:
            time.sleep(delays.random() * 0.002)
            if i + 1 < len(order):
                eng.place_ahead(order[i + 1], None, ticket=i + 1)
            placed.set()

    def side() -> None:
        picks = random.Random(3)
        while not stop.is_set():
            name = picks.choice(sorted(models))
            try:
                if not same(eng.infer(name, models[name][2], lane=1, fetch=True), ref[name]):
                    errors.append(("lane 1", name))
            except NotResidentError:  # in flight in lane 0, or its graph not captured yet
                pass
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(("lane 1", e))

    threads = [threading.Thread(target=f) for f in (lane0, receiver, side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert eng.stats.placed_ahead > 100 and eng.stats.swaps > len(order)
    assert all(not p.pins for p in eng.pool.placements.values())
    eng.pool.check()


def test_pages_placed_for_a_run_that_does_not_come_are_let_go(make_artifact, make_engine):
    a, _, xa = make_artifact("mlp", seed=23, name="a")
    b, _, xb = make_artifact("tied", seed=24, name="b")
    eng = make_engine(pool_mib=12, page_mib=2)
    eng.add("a", a)
    eng.add("b", b)
    ref = eng.infer("b", xb)
    eng.infer("a", xa)  # b partly evicted
    # Placed for run 7, but run 8 of b comes first: its pages let go, and run 8 places its own.
    eng.place_ahead("b", None, ticket=7)
    eng.place_ahead("b", None, ticket=9)  # one at a time: ignored
    assert same(eng.infer("b", xb, ticket=8), ref) and not eng.last_run().placed_ahead
    assert not eng.pool.placements["b"].pins
    # Placed for a run that fails before it runs (bad inputs): let go with its failure.
    eng.infer("a", xa)
    eng.place_ahead("b", None, ticket=10)
    with pytest.raises(InvalidInputError):
        eng.infer("b", [torch.randn(1, 3)], ticket=10)
    assert not eng.pool.placements["b"].pins and eng._models["b"].ahead is None
    # Placed, then the model removed: let go with it.
    eng.infer("a", xa)
    eng.place_ahead("b", None, ticket=11)
    eng.remove("b")
    assert "b" not in eng.pool.placements
    eng.pool.check()
    with pytest.raises(NotFoundError):
        eng.place_ahead("b", None, ticket=12)


@pytest.mark.parametrize(("device", "mode"), _cases(AHEAD_MODES))
def test_copies_started_ahead_are_kept_when_their_run_does_not_come(make_artifact, make_engine, device, mode):
    """Placing ahead also starts the copies (behind the run before, on the copy stream). A run that then does
    not come lets the pages go only once those copies landed, and what they brought stays: the next run of
    the model finds it resident."""
    a, _, xa = make_artifact("mlp", seed=27, name="a")
    b, _, xb = make_artifact("tied", seed=28, name="b")
    eng = make_engine(device, mode, pool_mib=12, page_mib=2)
    eng.add("a", a)
    eng.add("b", b)
    ref = eng.infer("b", xb)
    eng.infer("a", xa)  # b partly evicted
    assert eng.residency("b") is not Residency.RESIDENT
    eng.place_ahead("b", None, ticket=7)
    ahead = eng._models["b"].ahead
    assert ahead is not None and ahead.done.wait(10) and ahead.copies is not None
    assert same(eng.infer("b", xb, ticket=8), ref)  # not run 7: its copies landed, then its pages let go
    assert not eng.last_run().swapped and not eng.last_run().placed_ahead
    assert not eng.pool.placements["b"].pins
    eng.pool.check()


def test_a_run_without_a_ticket_lets_pages_placed_ahead_go(make_artifact, make_engine):
    a, _, xa = make_artifact("mlp", seed=25, name="a")
    eng = make_engine(pool_mib=12, page_mib=2)
    eng.add("a", a)
    ref = eng.infer("a", xa)
    eng.evict("a")
    eng.place_ahead("a", None, ticket=1)
    assert same(eng.infer("a", xa), ref) and not eng.last_run().placed_ahead
    assert not eng.pool.placements["a"].pins
    eng.pool.check()
