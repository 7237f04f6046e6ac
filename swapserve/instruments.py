"""Prometheus instruments (counters, gauges, histograms with labels) and their text exposition, built for a
registry of thousands of labelled series that is scraped on the serving event loop.

Why not ``prometheus_client``: with 400 functions its ``generate_latest`` took 240 ms (collect 110 ms, then
formatting) on our 2-core CI machine, all of it on the one loop that also runs the gateway and the scheduler —
each scrape stalled every request in flight. Here each series keeps its rendered text until it changes, so a
scrape formats only what moved since the last one, and :meth:`Registry.render_async` yields to the loop between
slices of series. The output is the text format 0.0.4 that ``prometheus_client`` writes (without its
``_created`` samples), which the tests check with ``prometheus_client``'s own parser.

Every update method is thread-safe (a lock per family).
"""

from __future__ import annotations

import asyncio
import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]

YIELD_EVERY = 256
"""Series rendered between two yields to the event loop in :meth:`Registry.render_async`."""


def _number(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    return repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Series:
    """One label set of a family. Its text is rendered again only after it changed."""

    __slots__ = ("_family", "label_values", "_labels", "_text", "value", "counts", "sum")

    def __init__(self, family: Family, values: tuple[str, ...]):
        self._family = family
        self.label_values = values
        self._labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(family.labelnames, values))
        self._text: str | None = None
        self.value = 0.0
        self.counts = [0] * (len(family.buckets) + 1) if family.kind == "histogram" else []
        self.sum = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if self._family.kind != "counter" or amount < 0:
            raise ValueError(f"{self._family.name}: only a counter's series increases, by a non-negative amount")
        with self._family.lock:
            self.value += amount
            self._text = None

    def set(self, value: float) -> None:
        if self._family.kind != "gauge":
            raise ValueError(f"{self._family.name} is a {self._family.kind}, not a gauge")
        with self._family.lock:
            self.value = float(value)
            self._text = None

    def observe(self, value: float) -> None:
        if self._family.kind != "histogram":
            raise ValueError(f"{self._family.name} is a {self._family.kind}, not a histogram")
        i = bisect_left(self._family.buckets, value)  # the first bucket whose upper bound is >= value
        with self._family.lock:
            self.counts[i] += 1
            self.sum += value
            self._text = None

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of each line of this series."""
        f, labels = self._family, dict(zip(self._family.labelnames, self.label_values))
        if f.kind == "counter":
            yield f.name + "_total", labels, self.value
        elif f.kind == "gauge":
            yield f.name, labels, self.value
        else:
            total = 0
            for bound, n in zip((*f.buckets, math.inf), self.counts):
                total += n
                yield f.name + "_bucket", {**labels, "le": _number(bound)}, float(total)
            yield f.name + "_count", labels, float(total)
            yield f.name + "_sum", labels, self.sum

    def text(self) -> str:
        text = self._text
        if text is None:
            with self._family.lock:
                text = self._text = self._render()
        return text

    def _render(self) -> str:
        f, lb = self._family, self._labels
        if f.kind == "counter":
            return f"{f.name}_total{{{lb}}} {_number(self.value)}\n" if lb else f"{f.name}_total {_number(self.value)}\n"
        if f.kind == "gauge":
            return f"{f.name}{{{lb}}} {_number(self.value)}\n" if lb else f"{f.name} {_number(self.value)}\n"
        sep = "," if lb else ""
        out, total = [], 0
        for le, n in zip(f.le_text, self.counts):
            total += n
            out.append(f'{f.name}_bucket{{{lb}{sep}le="{le}"}} {total}.0\n')
        tail = f"{{{lb}}}" if lb else ""
        out.append(f"{f.name}_count{tail} {total}.0\n{f.name}_sum{tail} {_number(self.sum)}\n")
        return "".join(out)


class Family:
    """A metric and its series by label values. A family without labels is also its own single series
    (``inc``, ``set``, ``observe`` on the family)."""

    def __init__(self, registry: Registry, kind: Kind, name: str, documentation: str,
                 labelnames: Iterable[str] = (), buckets: Iterable[float] = ()):
        self.kind: Kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        if "le" in self.labelnames and kind == "histogram":
            raise ValueError(f"{name}: 'le' is the histogram's own label")
        self.buckets = tuple(sorted(float(b) for b in buckets if b != math.inf))
        if kind == "histogram" and not self.buckets:
            raise ValueError(f"{name}: a histogram needs buckets")
        self.le_text = tuple(_number(b) for b in (*self.buckets, math.inf))
        self.lock = threading.Lock()
        self.series: dict[tuple[str, ...], Series] = {}
        doc = documentation.replace("\\", "\\\\").replace("\n", "\\n")
        shown = name + "_total" if kind == "counter" else name  # a counter's header names its sample, as
        self.header = f"# HELP {shown} {doc}\n# TYPE {shown} {kind}\n"  # prometheus_client writes it
        self.sample_names = {"counter": (name + "_total",), "gauge": (name,),
                             "histogram": (name + "_bucket", name + "_count", name + "_sum")}[kind]
        if not self.labelnames:
            self.labels()
        registry.register(self)

    def labels(self, *values: str) -> Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        s = self.series.get(values)
        if s is None:
            with self.lock:
                s = self.series.get(values)
                if s is None:
                    s = self.series[values] = Series(self, tuple(str(v) for v in values))
        return s

    def remove(self, *values: str) -> None:
        """Drop a label set's series (no error if it never existed)."""
        with self.lock:
            self.series.pop(tuple(values), None)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class Registry:
    """The families of one node, rendered in the order they were created."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def register(self, family: Family) -> None:
        if family.name in self._families:
            raise ValueError(f"a metric named {family.name!r} is already registered")
        self._families[family.name] = family

    def families(self, names: Iterable[str] | None = None) -> list[Family]:
        """Every family, or those named (by family name or any of its sample names, e.g. ``x_count``)."""
        fams = list(self._families.values())
        if names is None:
            return fams
        wanted = set(names)
        return [f for f in fams if f.name in wanted or wanted.intersection(f.sample_names)]

    def render(self, names: Iterable[str] | None = None) -> bytes:
        parts: list[str] = []
        for f in self.families(names):
            parts.append(f.header)
            parts.extend(s.text() for s in list(f.series.values()))
        return "".join(parts).encode()

    async def render_async(self, names: Iterable[str] | None = None) -> bytes:
        """:meth:`render`, yielding to the event loop every :data:`YIELD_EVERY` series, so that a scrape of
        thousands of series never holds the requests in flight for more than a slice."""
        parts: list[str] = []
        done = 0
        for f in self.families(names):
            parts.append(f.header)
            for s in list(f.series.values()):
                parts.append(s.text())
                done += 1
                if done % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        return "".join(parts).encode()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample (``prometheus_client``'s lookup, for tests and tools), None if absent."""
        want = labels or {}
        for f in self._families.values():
            if name not in f.sample_names:
                continue
            for s in list(f.series.values()):
                for sample, lbl, value in s.samples():
                    if sample == name and lbl == want:
                        return value
        return None
