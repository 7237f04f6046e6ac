"""Residency travels from the workers as changes (the models whose share moved, those gone), which the
controller applies in order and brings into the scheduler's view model by model: after any sequence of
pools, what the controller holds is what the worker has, the scheduler's view is what a full rebuild from it
would give, and the models that moved are touched (their eviction values computed again)."""

from __future__ import annotations

import random
from types import SimpleNamespace

from swapserve.node.dispatch import Dispatcher
from swapserve.node.messages import residency_change
from swapserve.node.workers import Residency
from swapserve.scheduler import DeviceState, LinkProfile, NodeState, Scheduler


def _pools(rng: random.Random, keys: list[str], steps: int) -> list[dict[str, float]]:
    """Pools as a worker's evolve: models come in (partly or whole), shrink, leave."""
    pools, present = [], {}
    for _ in range(steps):
        present = dict(present)
        for k in rng.sample(keys, 3):
            roll = rng.random()
            if roll < 0.3:
                present.pop(k, None)
            else:
                present[k] = 1.0 if roll < 0.65 else rng.choice([0.0, 0.25, 0.5, 0.75])
        pools.append(present)
    return pools


def _full(present: dict[str, float], by_key: dict[str, str]) -> tuple[set[str], dict[str, float]]:
    return ({by_key[k] for k, f in present.items() if f >= 1.0 and k in by_key},
            {by_key[k]: f for k, f in present.items() if f < 1.0 and k in by_key})


def test_changes_applied_in_order_give_the_workers_pool_and_the_scheduler_the_same_view_as_a_rebuild():
    rng = random.Random(0)
    keys = [f"m{i}@1" for i in range(12)]
    by_key = {k: k.split("@")[0] for k in keys[:10]}  # two keys no longer serve an entity (an old version)
    worker = SimpleNamespace(residency=Residency())
    state = NodeState([DeviceState(0, 1 << 30)], {}, {}, LinkProfile((50.0,)))
    dispatch = Dispatcher(state, Scheduler(), [worker], None, {}, by_key, None, lambda: 0.0, lambda k: None, 1)
    sent: dict[str, float] = {}
    for present in _pools(rng, keys, 200):
        change = residency_change(sent, present, 1 << 30, 123)
        sent = present
        assert len(change.changed) + len(change.gone) <= 3  # a change names only what moved
        state.devices[0].value_touched.clear()
        worker.residency.apply(change)
        dispatch.refresh_residency()
        assert worker.residency.present == present and not worker.residency.changed
        assert (state.devices[0].resident, state.devices[0].partial) == _full(present, by_key)
        # each entity whose share moved has its eviction values computed again (Scheduler.values)
        assert state.devices[0].value_touched == {by_key[k] for k in (*change.changed, *change.gone) if k in by_key}
    assert (worker.residency.pool_bytes, worker.residency.used_bytes) == (1 << 30, 123)


def test_an_unchanged_pool_sends_an_empty_change():
    change = residency_change({"a": 1.0, "b": 0.5}, {"a": 1.0, "b": 0.5}, 10, 5)
    assert (change.changed, change.gone) == ({}, ())
