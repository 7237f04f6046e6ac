"""The device page pool: pure bookkeeping of pages, slots and residency, checked step by step."""

from __future__ import annotations

import copy
import random

import pytest

from swapserve.engine.pages import PagePool, Residency
from swapserve.errors import CapacityError, PoolBusyError

PAGE = 100


def pool_of(num_pages: int, **models: int) -> PagePool:
    """A pool of ``num_pages`` pages with each model registered at ``n`` pages."""
    pool = PagePool(num_pages, PAGE)
    for name, pages in models.items():
        pool.register(name, pages * PAGE)
    pool.check()
    return pool


def swap_in(pool: PagePool, model: str, now: float, **kw) -> tuple:
    """A full use: acquire, copies land, release. Returns the plan."""
    plan = pool.acquire(model, now, **kw)
    pool.check()
    pool.loaded(model, plan.load)
    pool.check()
    pool.release(model)
    pool.check()
    return plan


def snapshot(pool: PagePool) -> tuple:
    return copy.deepcopy(pool.owner), copy.deepcopy(pool.placements), pool.free_pages


def valid_pages(pool: PagePool) -> list[int]:
    return [p.slots[i] for p in pool.placements.values() for i in range(p.n_slots) if p.valid[i]]


# --- register / unregister ---------------------------------------------------------------------


def test_register_rounds_up_to_pages_and_rejects_models_larger_than_the_pool():
    pool = PagePool(4, PAGE)
    p = pool.register("a", 3 * PAGE + 1)
    assert p.n_slots == 4 and p.slots == [None] * 4 and p.valid == [False] * 4
    assert pool.state("a") is Residency.ABSENT
    assert pool.register("one", 1).n_slots == 1
    with pytest.raises(CapacityError, match="needs 5 pages"):
        pool.register("big", 4 * PAGE + 1)
    assert set(pool.placements) == {"a", "one"}
    with pytest.raises(ValueError, match="already registered"):
        pool.register("a", PAGE)
    assert pool.placements["a"] is p
    pool.check()


def test_unregister_returns_mapped_slots_and_frees_owned_pages():
    pool = pool_of(4, a=3, b=2)
    swap_in(pool, "a", 1.0)
    assert pool.free_pages == 1
    swap_in(pool, "b", 2.0)  # takes a's tail slot
    a = pool.placements["a"]
    assert a.valid == [True, True, False]
    mapped = dict(pool.unregister("a"))
    pool.check()
    assert "a" not in pool.placements
    # every mapped slot is returned (including the one whose page b now owns) ...
    assert mapped == {i: pg for i, pg in enumerate(a.slots)} and len(mapped) == 3
    # ... but only the pages a still owned were freed; b keeps its bytes
    assert pool.free_pages == 2
    assert pool.state("b") is Residency.RESIDENT and pool.placements["b"].valid_count == 2
    pool.register("idle", PAGE)
    assert pool.unregister("idle") == []  # never placed: nothing to unmap
    pool.check()


def test_unregister_of_a_pinned_model_raises_and_changes_nothing():
    pool = pool_of(2, a=2)
    pool.acquire("a", 1.0)
    before = snapshot(pool)
    with pytest.raises(PoolBusyError):
        pool.unregister("a")
    assert snapshot(pool) == before


# --- acquire / loaded / release ------------------------------------------------------------------


def test_acquire_on_an_empty_pool_remaps_every_slot_and_pins():
    pool = pool_of(5, a=3)
    plan = pool.acquire("a", 7.0)
    pool.check()
    p = pool.placements["a"]
    assert plan.model == "a"
    assert plan.load == (0, 1, 2)
    assert [r.slot for r in plan.remaps] == [0, 1, 2]
    assert all(r.old_page is None for r in plan.remaps)
    assert len({r.new_page for r in plan.remaps}) == 3
    assert [r.new_page for r in plan.remaps] == p.slots
    assert plan.taken == ()
    assert p.state is Residency.LOADING and p.pins == 1 and p.uses == 1 and p.last_used == 7.0
    assert p.valid == [False] * 3  # nothing counts as loaded before the copies land
    assert pool.free_pages == 2
    assert all(pool.owner[pg] == ("a", i) for i, pg in enumerate(p.slots))


def test_loaded_and_release_state_transitions():
    pool = pool_of(4, a=3)
    plan = pool.acquire("a", 1.0)
    pool.loaded("a", plan.load[:1])
    pool.check()
    assert pool.state("a") is Residency.PARTIAL
    pool.loaded("a", plan.load[1:])
    pool.check()
    assert pool.state("a") is Residency.RESIDENT
    pool.release("a")
    pool.check()
    assert pool.state("a") is Residency.RESIDENT and pool.placements["a"].pins == 0

    assert pool.evict("a") == 3
    pool.check()
    assert pool.state("a") is Residency.ABSENT and pool.free_pages == 4

    # a load that never reported its slots: released back to ABSENT, nothing counts as valid
    pool.acquire("a", 2.0)
    assert pool.state("a") is Residency.LOADING
    pool.release("a")
    pool.check()
    assert pool.state("a") is Residency.ABSENT and pool.placements["a"].valid_count == 0

    # a load that reported only part of its slots: PARTIAL
    plan = pool.acquire("a", 3.0)
    pool.loaded("a", plan.load[:2])
    pool.release("a")
    pool.check()
    assert pool.state("a") is Residency.PARTIAL and pool.placements["a"].valid == [True, True, False]


def test_resident_model_acquires_with_no_load_and_no_remap():
    pool = pool_of(4, a=3)
    swap_in(pool, "a", 1.0)
    slots = list(pool.placements["a"].slots)
    owner = list(pool.owner)
    plan = pool.acquire("a", 2.0)
    pool.check()
    assert plan.load == () and plan.remaps == () and plan.taken == ()
    assert pool.state("a") is Residency.RESIDENT  # not LOADING: there is nothing to copy
    p = pool.placements["a"]
    assert p.pins == 1 and p.uses == 2 and p.last_used == 2.0
    assert p.slots == slots and pool.owner == owner
    pool.release("a")
    assert pool.state("a") is Residency.RESIDENT and p.pins == 0


def test_release_without_acquire_is_refused():
    pool = pool_of(2, a=1)
    with pytest.raises(AssertionError):
        pool.release("a")


def test_acquire_with_limit_claims_only_the_first_missing_slots():
    pool = pool_of(6, a=4)
    plan = pool.acquire("a", 1.0, limit=2)
    pool.check()
    assert plan.load == (0, 1) and [r.slot for r in plan.remaps] == [0, 1]
    p = pool.placements["a"]
    assert p.slots[2:] == [None, None] and pool.free_pages == 4
    pool.loaded("a", plan.load)
    pool.release("a")
    assert pool.state("a") is Residency.PARTIAL and p.valid == [True, True, False, False]
    # the limit counts missing slots, not slot indices: the next two missing are 2 and 3
    plan = pool.acquire("a", 2.0, limit=1)
    assert plan.load == (2,)
    pool.loaded("a", plan.load)
    pool.release("a")
    plan = pool.acquire("a", 3.0)
    assert plan.load == (3,)
    pool.loaded("a", plan.load)
    pool.release("a")
    pool.check()
    assert pool.state("a") is Residency.RESIDENT
    # limit=0: a pin with nothing to copy
    plan = pool.acquire("a", 4.0, limit=0)
    assert plan.load == () and plan.remaps == ()
    pool.release("a")


# --- victims ---------------------------------------------------------------------------------------


def test_victim_is_the_least_recently_used_by_default():
    pool = pool_of(4, a=2, b=2, c=2)
    swap_in(pool, "a", 1.0)
    swap_in(pool, "b", 2.0)
    swap_in(pool, "a", 3.0)  # a is now more recent than b
    plan = swap_in(pool, "c", 4.0)
    assert [m for m, _ in plan.taken] == ["b"]
    assert pool.state("a") is Residency.RESIDENT
    assert pool.state("b") is Residency.ABSENT
    assert pool.state("c") is Residency.RESIDENT


def test_custom_value_decides_the_victim():
    by_uses = lambda p: p.uses  # noqa: E731 - LFU: keep the often-used model
    for value_in_pool in (True, False):
        pool = PagePool(4, PAGE, **({"value": by_uses} if value_in_pool else {}))
        for m in "abc":
            pool.register(m, 2 * PAGE)
        for t in range(3):
            swap_in(pool, "a", float(t))
        swap_in(pool, "b", 10.0)  # b is the most recent but used once
        plan = swap_in(pool, "c", 11.0, **({} if value_in_pool else {"value": by_uses}))
        assert [m for m, _ in plan.taken] == ["b"], value_in_pool
        assert pool.state("a") is Residency.RESIDENT


def test_victims_in_increasing_value_until_enough_pages():
    pool = pool_of(6, a=2, b=2, c=2, d=5)
    swap_in(pool, "c", 1.0)
    swap_in(pool, "a", 2.0)
    swap_in(pool, "b", 3.0)
    plan = swap_in(pool, "d", 4.0)
    # c (oldest) goes whole, then a, then one page of b
    assert plan.taken == (("c", (1, 0)), ("a", (1, 0)), ("b", (1,)))
    assert pool.state("c") is Residency.ABSENT
    assert pool.state("a") is Residency.ABSENT
    assert pool.state("b") is Residency.PARTIAL


def test_partial_eviction_takes_the_victims_tail_first():
    pool = pool_of(6, a=4, b=4)
    swap_in(pool, "a", 1.0)
    plan = pool.acquire("b", 2.0)
    pool.check()
    assert plan.taken == (("a", (3, 2)),)
    a = pool.placements["a"]
    assert a.valid == [True, True, False, False] and a.state is Residency.PARTIAL
    # the taken pages are now b's
    taken_pages = {a.slots[2], a.slots[3]}
    b = pool.placements["b"]
    assert taken_pages <= set(b.slots)
    assert all(pool.owner[pg][0] == "b" for pg in taken_pages)
    pool.loaded("b", plan.load)
    pool.release("b")
    # a comes back: only its two tail slots are copied, into the very pages they still map
    plan = pool.acquire("a", 3.0)
    pool.check()
    assert plan.load == (2, 3) and plan.remaps == ()
    ((victim, lost),) = plan.taken
    assert victim == "b" and {b.slots[j] for j in lost} == taken_pages


def test_returning_model_reuses_the_pages_its_slots_still_map():
    pool = pool_of(4, a=2, b=1)
    swap_in(pool, "a", 1.0)
    a_slots = list(pool.placements["a"].slots)
    assert pool.evict("a") == 2
    pool.check()
    assert pool.placements["a"].slots == a_slots  # mappings stay, only ownership goes
    swap_in(pool, "b", 2.0)  # two pages stay free for b; which one it takes is not ours to say
    b_page = pool.placements["b"].slots[0]
    plan = pool.acquire("a", 3.0)
    pool.check()
    assert plan.load == (0, 1)
    kept = [i for i in range(2) if a_slots[i] != b_page]
    assert [r.slot for r in plan.remaps] == [i for i in range(2) if i not in kept]
    assert all(pool.placements["a"].slots[i] == a_slots[i] for i in kept)
    # the same with a page that went through another model and came back free
    pool.loaded("a", plan.load)
    pool.release("a")
    pool.evict("a")
    pool.evict("b")
    a_slots = list(pool.placements["a"].slots)
    plan = pool.acquire("a", 4.0)
    assert plan.remaps == () and plan.load == (0, 1)
    assert pool.placements["a"].slots == a_slots


def test_victim_pages_mapped_by_the_returning_model_are_taken_first_and_not_remapped():
    pool = pool_of(3, a=2, b=2)
    swap_in(pool, "a", 1.0)
    a_slots = list(pool.placements["a"].slots)
    swap_in(pool, "b", 2.0)  # takes a's tail (slot 1)
    assert pool.placements["a"].valid == [True, False]
    plan = pool.acquire("a", 3.0)
    pool.check()
    # a needs one page; b's page that a's slot 1 still maps is preferred (no remap), not b's tail
    assert plan.load == (1,)
    assert plan.remaps == ()
    assert pool.placements["a"].slots == a_slots
    assert len(plan.taken) == 1 and plan.taken[0][0] == "b"
    b = pool.placements["b"]
    (lost,) = plan.taken[0][1]
    assert b.slots[lost] == a_slots[1] and not b.valid[lost]


def test_slots_whose_old_page_a_victim_freed_keep_it():
    pool = pool_of(4, a=2, b=3, c=1)
    swap_in(pool, "a", 1.0)  # a: slots -> pages 0, 1
    pool.evict("a")
    pool.acquire("c", 2.0)   # c takes a page that a's slot 0 maps; c stays pinned
    c_page = pool.placements["c"].slots[0]
    pool.loaded("c", (0,))
    swap_in(pool, "b", 3.0)  # b takes the rest, among them the page a's slot 1 maps
    a = pool.placements["a"]
    assert c_page == a.slots[0] and pool.owner[a.slots[1]][0] == "b"
    old1 = a.slots[1]
    plan = pool.acquire("a", 4.0)
    pool.check()
    assert plan.load == (0, 1)
    # slot 0 must move (its page is c's, pinned); slot 1's page was freed from b: it should stay
    assert a.slots[1] == old1
    assert [r.slot for r in plan.remaps] == [0]


def test_pinned_models_are_never_victims_and_busy_leaves_state_unchanged():
    pool = pool_of(4, a=2, b=2, c=3)
    swap_in(pool, "a", 1.0)
    pool.acquire("b", 2.0)  # b stays pinned (in flight)
    before = snapshot(pool)
    with pytest.raises(PoolBusyError, match="needs 3 more pages and 2 pages are held by models in use"):
        pool.acquire("c", 3.0)  # needs 3: a's 2 are not enough, b's are pinned (claimed, still loading)
    assert snapshot(pool) == before
    pool.check()
    c = pool.placements["c"]
    assert c.pins == 0 and c.uses == 0 and c.last_used == 0.0 and c.state is Residency.ABSENT
    # after b finishes, c fits, and with b the most recent, a goes whole before b loses a page
    pool.loaded("b", (0, 1))
    pool.release("b")
    plan = pool.acquire("c", 4.0)
    pool.check()
    assert [m for m, _ in plan.taken] == ["a", "b"]
    assert pool.state("a") is Residency.ABSENT
    assert pool.state("b") is Residency.PARTIAL


def test_a_model_never_takes_pages_from_itself_and_a_second_use_reloads_loading_slots():
    pool = pool_of(2, a=2)
    p1 = pool.acquire("a", 1.0)
    p2 = pool.acquire("a", 2.0)  # a second in-flight use before the first load landed
    pool.check()
    assert p2.load == (0, 1) and p2.remaps == () and p2.taken == ()
    assert pool.placements["a"].pins == 2
    pool.loaded("a", p1.load)
    pool.release("a")
    pool.loaded("a", p2.load)
    pool.release("a")
    pool.check()
    assert pool.state("a") is Residency.RESIDENT


def test_evict_of_a_pinned_model_raises():
    pool = pool_of(2, a=2)
    plan = pool.acquire("a", 1.0)
    pool.loaded("a", plan.load)
    before = snapshot(pool)
    with pytest.raises(PoolBusyError, match="in use"):
        pool.evict("a")
    assert snapshot(pool) == before
    pool.release("a")
    assert pool.evict("a") == 2
    assert pool.evict("a") == 0  # already gone
    pool.check()


def test_pages_of_an_interrupted_load_can_be_reclaimed():
    # In the engine this is any run that raises before pool.loaded(), e.g. an out-of-vocabulary
    # token id: afterwards every other model gets PoolBusyError until someone calls evict().
    pool = pool_of(2, a=2, b=2)
    pool.acquire("a", 1.0)
    pool.release("a")  # the copies or the forward pass failed
    pool.check()
    assert pool.state("a") is Residency.ABSENT
    plan = pool.acquire("b", 2.0)  # nothing is in use: b must be placeable
    assert plan.load == (0, 1)


def test_drop_stale_forgets_the_slots_whose_pages_another_model_took():
    pool = pool_of(3, a=2, b=2)
    swap_in(pool, "a", 1.0)
    a = pool.placements["a"]
    head, tail = a.slots
    swap_in(pool, "b", 2.0)  # takes a's tail
    assert pool.owner[tail][0] == "b"
    assert pool.drop_stale("a") == [(1, tail)]
    pool.check()
    assert a.slots == [head, None] and a.valid == [True, False]  # the head, still a's, stays mapped
    assert pool.drop_stale("a") == []
    plan = pool.acquire("a", 3.0)  # slot 1 is mapped anew: a map, and no unmap first
    pool.check()
    assert plan.load == (1,) and [(r.slot, r.old_page) for r in plan.remaps] == [(1, None)]


def test_drop_stale_keeps_free_pages_mapped_and_leaves_pinned_models_alone():
    pool = pool_of(4, a=2, b=1)
    swap_in(pool, "a", 1.0)
    pool.evict("a")  # its pages are free: a return reuses them with no remap
    assert pool.drop_stale("a") == []
    plan = pool.acquire("a", 2.0)
    swap_in(pool, "b", 3.0)
    pool.check()
    assert pool.drop_stale("a") == [] and plan.remaps == ()  # pinned: a holder may be remapping it


def test_restore_stale_puts_back_mappings_that_could_not_be_unmapped():
    pool = pool_of(3, a=2, b=2)
    swap_in(pool, "a", 1.0)
    swap_in(pool, "b", 2.0)
    tail = pool.placements["a"].slots[1]
    stale = pool.drop_stale("a")
    pool.restore_stale("a", stale)
    pool.check()
    assert pool.placements["a"].slots[1] == tail  # a placement would unmap it itself
    assert pool.drop_stale("a") == stale


# --- randomized ----------------------------------------------------------------------------------


def _available_for(pool: PagePool, model: str, need: list[int]) -> int:
    """Pages ``model`` could claim for ``need``: free ones, those its needed slots own already, and
    valid pages of unpinned other models."""
    p = pool.placements[model]
    own = sum(1 for i in need if p.slots[i] is not None and pool.owner[p.slots[i]] == (model, i))
    others = sum(q.valid_count for q in pool.placements.values() if q.model != model and not q.pins)
    return pool.free_pages + own + others


def _random_run(seed: int, with_limit: bool) -> None:
    """A seeded sequence of register/acquire/finish(loaded+release)/evict/unregister over several
    models; every step keeps the invariants."""
    rng = random.Random(seed)
    num_pages = rng.randint(4, 12)
    pool = PagePool(num_pages, PAGE)
    sizes = {f"m{i}": rng.randint(1, num_pages) for i in range(rng.randint(3, 6))}
    inflight: list[tuple[str, tuple[int, ...]]] = []
    now = 0.0
    for _step in range(400):
        now += 1.0
        op = rng.choices(["register", "acquire", "finish", "evict", "unregister", "drop_stale"],
                         weights=[2, 8, 8, 1, 1, 3])[0]
        if op == "register":
            name = rng.choice(list(sizes))
            if name not in pool.placements:
                pool.register(name, sizes[name] * PAGE - rng.randint(0, PAGE - 1))
        elif op == "acquire" and pool.placements:
            name = rng.choice(list(pool.placements))
            p = pool.placements[name]
            limit = rng.choice([None, None, rng.randint(0, p.n_slots)]) if with_limit else None
            need = [i for i in range(p.n_slots) if not p.valid[i]][:limit]
            before = snapshot(pool)
            feasible = _available_for(pool, name, need) >= len(need)
            try:
                plan = pool.acquire(name, now, limit=limit)
            except PoolBusyError:
                assert not feasible, "refused although unpinned pages were enough"
                assert snapshot(pool) == before
            else:
                assert feasible
                assert plan.load == tuple(need)
                claimed = [p.slots[i] for i in need]
                assert len(set(claimed)) == len(claimed), f"slots of {name} share a page: {p.slots}"
                assert all(pool.owner[p.slots[i]] == (name, i) for i in need)
                assert {r.slot for r in plan.remaps} <= set(need)
                assert all(p.slots[r.slot] == r.new_page for r in plan.remaps)
                for victim, lost in plan.taken:
                    q = pool.placements[victim]
                    assert victim != name and q.pins == 0 and not any(q.valid[j] for j in lost)
                inflight.append((name, plan.load))
        elif op == "finish" and inflight:
            name, load = inflight.pop(rng.randrange(len(inflight)))
            pool.loaded(name, load)
            pool.release(name)
        elif op == "drop_stale" and pool.placements:
            name = rng.choice(list(pool.placements))
            p = pool.placements[name]
            before = list(p.slots)
            stale = pool.drop_stale(name)
            if p.pins:
                assert stale == [] and p.slots == before
            else:
                assert all(before[i] == pg and p.slots[i] is None and pool.owner[pg] not in (None, (name, i))
                           for i, pg in stale)
                assert all(pg is None or pool.owner[pg] in (None, (name, i)) for i, pg in enumerate(p.slots))
        elif op in ("evict", "unregister") and pool.placements:
            name = rng.choice(list(pool.placements))
            if pool.placements[name].pins:
                before = snapshot(pool)
                with pytest.raises(PoolBusyError):
                    getattr(pool, op)(name)
                assert snapshot(pool) == before
            elif op == "evict":
                pool.evict(name)
                assert pool.state(name) is Residency.ABSENT
            else:
                pool.unregister(name)
        pool.check()
        pages = valid_pages(pool)
        assert len(pages) == len(set(pages)) <= num_pages
        assert pool.free_pages + sum(o is not None for o in pool.owner) == num_pages
        for p in pool.placements.values():
            assert p.pins == sum(1 for n, _ in inflight if n == p.model)
            if p.state is Residency.RESIDENT:
                assert p.valid_count == p.n_slots
            elif p.state is Residency.ABSENT:
                assert p.valid_count == 0
            elif p.state is Residency.PARTIAL:
                assert 0 < p.valid_count < p.n_slots
            else:
                assert p.pins > 0
    # drain: everything can finish, be evicted and be forgotten
    for name, load in inflight:
        pool.loaded(name, load)
        pool.release(name)
    for name in list(pool.placements):
        pool.unregister(name)
    pool.check()
    assert pool.free_pages == num_pages and pool.owner == [None] * num_pages


@pytest.mark.parametrize("seed", range(10))
def test_random_sequences_keep_the_invariants(seed):
    _random_run(seed, with_limit=False)


def test_random_sequences_with_limit_keep_the_invariants():
    for seed in range(10):
        _random_run(seed, with_limit=True)


def test_limited_acquire_never_lets_two_slots_load_into_one_page():
    # engine.prefetch(max_bytes=...) is an acquire with a limit; the next infer after churn hits this
    pool = pool_of(2, a=2, c=1, f=1)
    swap_in(pool, "a", 1.0)
    pool.evict("a")
    swap_in(pool, "f", 2.0)
    swap_in(pool, "c", 3.0)
    a = pool.placements["a"]
    assert pool.free_pages == 0 and a.slots[0] != a.slots[1]
    holder_of_0 = pool.owner[a.slots[0]][0]
    pool.evict(pool.owner[a.slots[1]][0])  # a's slot 1 page is free again, slot 0's is still taken
    plan = pool.acquire("a", 4.0, limit=1)
    pool.check()
    assert plan.load == (0,)
    pool.loaded("a", plan.load)
    pool.release("a")
    pool.evict("a")
    pool.evict(holder_of_0)
    assert pool.free_pages == 2
    plan = pool.acquire("a", 5.0)
    pool.check()
    assert plan.load == (0, 1)
    # each slot must get a page of its own, or slot 1's copy overwrites slot 0's bytes
    assert a.slots[0] != a.slots[1]
    pool.loaded("a", plan.load)
