"""The heap's freeze and the collector's pause log (swapserve.heap)."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator

import pytest

from swapserve.heap import PauseLog, freeze, settle, watch_pauses


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting as before


def test_freeze_collects_then_takes_what_is_alive_out_of_the_collectors_reach(unfrozen: None) -> None:
    class Cycle:
        pass

    kept = Cycle()
    kept.me = kept  # type: ignore[attr-defined]
    dropped = Cycle()
    dropped.me = dropped  # type: ignore[attr-defined]
    gone = weakref.ref(dropped)
    del dropped
    frozen = freeze()
    assert gone() is None  # garbage in a cycle is collected first, not frozen
    # What it froze, less any frozen object that died since (the test process has other threads: CI saw 2 go).
    assert 0 < gc.get_freeze_count() <= frozen.objects
    assert frozen.collect_ms >= 0
    assert not any(o is kept for o in gc.get_objects())  # out of the collector's reach
    assert kept.me is kept


def test_a_collection_as_long_as_the_limit_is_logged_with_its_generation(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.heap")
    pauses = watch_pauses(logger, "this process", min_ms=0.0)
    try:
        with caplog.at_level(logging.WARNING, logger="test.heap"):
            gc.collect(1)
    finally:
        gc.callbacks.remove(pauses)
    assert any("this process: a garbage collection (generation 1," in r.getMessage() for r in caplog.records)


def test_shorter_collections_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.heap")
    pauses = watch_pauses(logger, "this process", min_ms=60_000.0)
    try:
        with caplog.at_level(logging.WARNING, logger="test.heap"):
            gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    assert not [r for r in caplog.records if r.name == "test.heap"]


def test_settle_freezes_then_watches_the_pauses_once(unfrozen: None) -> None:
    logger = logging.getLogger("test.heap")
    before = list(gc.callbacks)
    try:
        first = settle(logger, "this process")
        settle(logger, "this process")
        added = [c for c in gc.callbacks if c not in before]
        assert len(added) == 1 and isinstance(added[0], PauseLog)
        assert first.objects > 0
    finally:
        gc.callbacks[:] = before
