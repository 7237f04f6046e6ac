"""The device page pool and the residency of every model on one device, kept in one place.

Pure bookkeeping, no device calls: which physical page holds which model's bytes, which pages each
model's fixed virtual range maps, and each model's residency state.

Every model owns a fixed virtual address range (so CUDA graphs captured against it stay valid) cut
into page-sized slots. A physical page may stay mapped into the ranges of several models at once;
exactly one of them *owns* it (its bytes are that model's). Swapping a model in claims a page for
each of its slots that does not hold valid bytes, preferring the page the slot already maps (no
remap), then free pages, then pages taken from the least valuable unpinned models, tail first, so
a partly evicted model keeps its early layers and can start computing as soon as it is launched.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from swapserve.errors import CapacityError, PoolBusyError


class Residency(enum.Enum):
    ABSENT = "absent"
    """No valid byte on this device."""
    LOADING = "loading"
    """A swap-in is copying the model's missing pages."""
    PARTIAL = "partial"
    """Some pages valid: a partial eviction or an interrupted load."""
    RESIDENT = "resident"
    """Every page valid: runs with no copy and no wait."""


@dataclass
class Placement:
    """One model on one device."""

    model: str
    slots: list[int | None]
    """Physical page mapped at each slot of the model's virtual range (None: unmapped)."""
    valid: list[bool]
    """Slot i's page holds this model's bytes."""
    state: Residency = Residency.ABSENT
    pins: int = 0
    """In-flight uses. A pinned model's pages are never taken."""
    last_used: float = 0.0
    uses: int = 0

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def valid_count(self) -> int:
        return sum(self.valid)


@dataclass(frozen=True)
class Remap:
    slot: int
    old_page: int | None
    new_page: int


@dataclass(frozen=True)
class PlacementPlan:
    """What a swap-in must do on the device, decided atomically by :meth:`PagePool.acquire`."""

    model: str
    remaps: tuple[Remap, ...]
    """Slots whose virtual range must be remapped before copying (unmap old page, map new)."""
    load: tuple[int, ...]
    """Slots whose bytes must be copied from host memory."""
    taken: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Pages taken from other models: (model, its slots that lost their bytes)."""


Value = Callable[[Placement], float]
"""Worth of keeping a model's pages; the lowest is evicted first."""


def lru_value(p: Placement) -> float:
    return p.last_used


@dataclass
class PagePool:
    num_pages: int
    page_bytes: int
    value: Value = lru_value
    placements: dict[str, Placement] = field(default_factory=dict)
    owner: list[tuple[str, int] | None] = field(init=False)
    _free: set[int] = field(init=False)
    version: int = field(init=False, default=0)
    """Bumped whenever some model's valid pages change (reporters send residency only then)."""
    holding: dict[str, None] = field(init=False, default_factory=dict)
    """The models with at least one valid page, in the order they got there (an ordered set): what eviction
    and residency reports look at, rather than every model ever registered (hundreds on a busy node)."""

    def __post_init__(self) -> None:
        self.owner = [None] * self.num_pages
        self._free = set(range(self.num_pages))

    # --- models -------------------------------------------------------------------------------

    def register(self, model: str, nbytes: int) -> Placement:
        n = -(-nbytes // self.page_bytes)
        if n > self.num_pages:
            raise CapacityError(
                f"model {model!r} needs {n} pages ({nbytes / 2**20:.1f} MiB) but the device pool has only "
                f"{self.num_pages} pages ({self.num_pages * self.page_bytes / 2**20:.0f} MiB); raise pool_bytes"
            )
        if model in self.placements:
            raise ValueError(f"model {model!r} is already registered")
        p = Placement(model, [None] * n, [False] * n)
        self.placements[model] = p
        return p

    def unregister(self, model: str) -> list[tuple[int, int]]:
        """Forget a model; returns its mapped (slot, page) pairs for the caller to unmap."""
        p = self.placements[model]
        if p.pins:
            raise PoolBusyError(f"model {model!r} is in use")
        self._drop_pages(p)
        del self.placements[model]
        return [(i, pg) for i, pg in enumerate(p.slots) if pg is not None]

    def state(self, model: str) -> Residency:
        return self.placements[model].state

    # --- swap-in ------------------------------------------------------------------------------

    def acquire(self, model: str, now: float, value: Value | None = None, limit: int | None = None) -> PlacementPlan:
        """Pin ``model`` and claim a page for every slot without valid bytes (only the first ``limit``
        of them, in first-use order, when given).

        Raises :class:`PoolBusyError` when only pinned models hold the pages it would need (and
        leaves everything as it was).
        """
        p = self.placements[model]
        need = [i for i in range(p.n_slots) if not p.valid[i]][:limit]
        kept: list[int] = []
        claimed: set[int] = set()  # after a remap, a stale slot may still map a page another slot now uses
        for i in need:
            pg = p.slots[i]
            if pg is not None and pg not in claimed and (pg in self._free or self.owner[pg] == (model, i)):
                kept.append(i)
                claimed.add(pg)
        rest = [i for i in need if i not in set(kept)]
        deficit = len(rest) - (len(self._free) - sum(p.slots[i] in self._free for i in kept))
        plan_take = self._choose_victims(model, rest, deficit, value or self.value) if deficit > 0 else []
        # Feasible: from here on, change state.
        for i in kept:
            self._free.discard(p.slots[i])  # type: ignore[arg-type]
            self.owner[p.slots[i]] = (model, i)  # type: ignore[index]
        taken = []
        for q, grab in plan_take:
            for j in grab:
                pg = q.slots[j]
                assert pg is not None
                q.valid[j] = False
                self.owner[pg] = None
                self._free.add(pg)
            q.state = Residency.PARTIAL if q.valid_count else Residency.ABSENT
            self._holds(q)
            taken.append((q.model, tuple(grab)))
            self.version += 1
        remaps = []
        unmapped = []
        for i in rest:  # first, slots whose mapped page a victim just freed: no remap
            old = p.slots[i]
            if old is not None and old in self._free:
                self._free.discard(old)
                self.owner[old] = (model, i)
            else:
                unmapped.append(i)
        for i in unmapped:
            new = next(iter(self._free))
            remaps.append(Remap(i, p.slots[i], new))
            self._free.discard(new)
            self.owner[new] = (model, i)
            p.slots[i] = new
        p.pins += 1
        p.uses += 1
        p.last_used = now
        if need:
            p.state = Residency.LOADING
        return PlacementPlan(model, tuple(remaps), tuple(need), tuple(taken))

    def _choose_victims(self, model: str, rest: list[int], deficit: int, value: Value) -> list[tuple[Placement, list[int]]]:
        """Pages to take, least valuable unpinned models first, each one's tail first (preferring pages
        the model's own slots already map: those need no remap)."""
        p = self.placements[model]
        wanted = {p.slots[i] for i in rest} - {None}
        victims = sorted((q for m in self.holding if m != model and not (q := self.placements[m]).pins), key=value)
        plan: list[tuple[Placement, list[int]]] = []
        short = deficit
        for q in victims:
            owned = [j for j in range(q.n_slots) if q.valid[j]]
            owned.sort(key=lambda j: (q.slots[j] not in wanted, -j))
            grab = owned[:short]
            plan.append((q, grab))
            short -= len(grab)
            if short <= 0:
                return plan
        # Pages of models in use: loaded, or claimed for a load still landing (counted by owner, not as valid).
        busy = sum(1 for o in self.owner if o is not None and o[0] != model and self.placements[o[0]].pins)
        raise PoolBusyError(f"cannot place {model!r} now: it needs {deficit} more pages and {busy} pages are held by "
                            "models in use; retry when they finish")

    def loaded(self, model: str, slots: list[int] | tuple[int, ...]) -> None:
        """The bytes of ``slots`` have landed (call once the copies are complete)."""
        p = self.placements[model]
        for i in slots:
            pg = p.slots[i]
            assert pg is not None and self.owner[pg] == (model, i), "page lost while loading"
            p.valid[i] = True
        if slots:
            self.version += 1
        p.state = Residency.RESIDENT if p.valid_count == p.n_slots else (
            Residency.PARTIAL if p.valid_count else Residency.ABSENT)
        self._holds(p)

    def lend(self, model: str) -> tuple[int, ...] | None:
        """Pin a wholly resident model for another device to read, and return the page of each slot; None
        (nothing pinned) if it is not wholly here. :meth:`release` ends it."""
        p = self.placements[model]
        if p.state is not Residency.RESIDENT:
            return None
        p.pins += 1
        return tuple(pg for pg in p.slots if pg is not None)  # every slot: all are valid

    def release(self, model: str) -> None:
        """End of an in-flight use (after :meth:`acquire`, once the device is done with it)."""
        p = self.placements[model]
        assert p.pins > 0
        p.pins -= 1
        if not p.pins:  # pages claimed for a load that never landed (failed, or cut short) go back
            for i, pg in enumerate(p.slots):
                if pg is not None and not p.valid[i] and self.owner[pg] == (model, i):
                    self.owner[pg] = None
                    self._free.add(pg)
        if p.state == Residency.LOADING:  # a load that did not report its slots: they stay invalid
            p.state = Residency.RESIDENT if p.valid_count == p.n_slots else (
                Residency.PARTIAL if p.valid_count else Residency.ABSENT)

    # --- eviction -----------------------------------------------------------------------------

    def evict(self, model: str) -> int:
        """Drop the model's device copy (its mappings stay, for a cheap return). Returns pages freed."""
        p = self.placements[model]
        if p.pins:
            raise PoolBusyError(f"model {model!r} is in use and cannot be evicted now")
        return self._drop_pages(p)

    def _drop_pages(self, p: Placement) -> int:
        self.version += 1
        n = 0
        for i, pg in enumerate(p.slots):
            if pg is not None and self.owner[pg] == (p.model, i):
                self.owner[pg] = None
                self._free.add(pg)
                n += p.valid[i]
            p.valid[i] = False
        p.state = Residency.ABSENT
        self._holds(p)
        return n

    def _holds(self, p: Placement) -> None:
        """Keep :attr:`holding` current after ``p``'s valid pages changed."""
        if p.valid_count:
            self.holding.setdefault(p.model)
        else:
            self.holding.pop(p.model, None)

    # --- stale mappings -----------------------------------------------------------------------

    def drop_stale(self, model: str) -> list[tuple[int, int]]:
        """Forget the mappings of an unpinned model's slots whose pages another model has taken since (their
        bytes are gone: the model's next placement would remap those slots anyway); returns them, as (slot,
        page) pairs, for the caller to unmap. Nothing for a pinned model (a holder may be remapping it)."""
        p = self.placements[model]
        if p.pins:
            return []
        stale = [(i, pg) for i, pg in enumerate(p.slots)
                 if pg is not None and self.owner[pg] is not None and self.owner[pg] != (model, i)]
        for i, _pg in stale:
            p.slots[i] = None
        return stale

    def restore_stale(self, model: str, stale: list[tuple[int, int]]) -> None:
        """Undo :meth:`drop_stale` for mappings that could not be unmapped: the next placement unmaps them."""
        p = self.placements[model]
        for i, pg in stale:
            if p.slots[i] is None:
                p.slots[i] = pg

    # --- accounting ---------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def check(self) -> None:
        """Assert the invariants (used by tests): valid slots own their page, owners agree."""
        for model, p in self.placements.items():
            for i, ok in enumerate(p.valid):
                if ok:
                    pg = p.slots[i]
                    assert pg is not None and self.owner[pg] == (model, i), (model, i)
        assert self._free == {pg for pg, o in enumerate(self.owner) if o is None}
        assert set(self.holding) == {m for m, p in self.placements.items() if p.valid_count}, self.holding
        for pg, o in enumerate(self.owner):
            if o is not None:
                m, i = o
                assert self.placements[m].slots[i] == pg, (pg, o)
