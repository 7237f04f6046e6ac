"""The Prometheus instruments and their exposition, checked with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swapserve.instruments import Family, Registry


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def make() -> tuple[Registry, Family, Family, Family]:
    r = Registry()
    c = Family(r, "counter", "x_requests", "Requests.", ["function", "code"])
    g = Family(r, "gauge", "x_queued", "Queued now.")
    h = Family(r, "histogram", "x_seconds", "Latency.", ["function"], buckets=(0.001, 0.01, 0.1))
    return r, c, g, h


def test_exposition_parses_with_the_values_recorded() -> None:
    r, c, g, h = make()
    c.labels("f", "200").inc()
    c.labels("f", "200").inc(2)
    c.labels("g", "503").inc()
    g.set(7)
    for v in (0.0005, 0.001, 0.05, 3.0):
        h.labels("f").observe(v)
    samples = parsed(r.render())
    assert samples[("x_requests_total", (("code", "200"), ("function", "f")))] == 3
    assert samples[("x_requests_total", (("code", "503"), ("function", "g")))] == 1
    assert samples[("x_queued", ())] == 7
    bucket = {le: samples[("x_seconds_bucket", (("function", "f"), ("le", le)))] for le in ("0.001", "0.01", "0.1", "+Inf")}
    assert bucket == {"0.001": 2, "0.01": 2, "0.1": 3, "+Inf": 4}  # cumulative, upper bounds inclusive
    assert samples[("x_seconds_count", (("function", "f"),))] == 4
    assert samples[("x_seconds_sum", (("function", "f"),))] == pytest.approx(3.0515)
    types = {f.name: f.type for f in text_string_to_metric_families(r.render().decode())}
    assert types == {"x_requests": "counter", "x_queued": "gauge", "x_seconds": "histogram"}


def test_a_changed_series_is_rendered_anew_an_unchanged_one_reused() -> None:
    r, c, g, h = make()
    c.labels("f", "200").inc()
    h.labels("f").observe(0.002)
    first = r.render()
    assert r.render() == first
    c.labels("f", "200").inc()
    h.labels("f").observe(0.2)
    g.set(-1.5)
    samples = parsed(r.render())
    assert samples[("x_requests_total", (("code", "200"), ("function", "f")))] == 2
    assert samples[("x_seconds_count", (("function", "f"),))] == 2
    assert samples[("x_queued", ())] == -1.5


def test_label_values_are_escaped() -> None:
    r, c, _, _ = make()
    c.labels('we"ird\\na\nme', "200").inc()
    samples = parsed(r.render())
    assert samples[("x_requests_total", (("code", "200"), ("function", 'we"ird\\na\nme')))] == 1


def test_special_values() -> None:
    r, _, g, _ = make()
    for v, want in ((math.inf, math.inf), (-math.inf, -math.inf)):
        g.set(v)
        assert parsed(r.render())[("x_queued", ())] == want
    g.set(math.nan)
    assert math.isnan(parsed(r.render())[("x_queued", ())])


def test_remove_and_lookup() -> None:
    r, c, _, h = make()
    c.labels("f", "200").inc()
    c.labels("g", "200").inc()
    h.labels("f").observe(0.5)
    c.remove("f", "200")
    c.remove("never", "seen")  # harmless
    assert r.get_sample_value("x_requests_total", {"function": "f", "code": "200"}) is None
    assert r.get_sample_value("x_requests_total", {"function": "g", "code": "200"}) == 1
    assert r.get_sample_value("x_seconds_bucket", {"function": "f", "le": "+Inf"}) == 1
    assert r.get_sample_value("x_seconds_bucket", {"function": "f", "le": "0.1"}) == 0
    assert 'function="f"' not in r.render().decode().split("x_seconds")[0]


def test_names_restrict_the_exposition() -> None:
    r, c, g, h = make()
    c.labels("f", "200").inc()
    g.set(1)
    h.labels("f").observe(0.5)
    only = {f.name for f in text_string_to_metric_families(r.render(["x_seconds_count", "x_queued"]).decode())}
    assert only == {"x_seconds", "x_queued"}  # a sample's name picks its family
    assert r.render(["nothing"]) == b""


def test_async_render_equals_render_and_yields() -> None:
    r, c, _, h = make()
    for i in range(1000):
        c.labels(f"f{i}", "200").inc()
        h.labels(f"f{i}").observe(0.01)

    async def main() -> tuple[bytes, int]:
        ticks = 0

        async def other() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        text = await r.render_async()
        task.cancel()
        return text, ticks

    text, ticks = asyncio.run(main())
    assert text == r.render()
    assert ticks > 2  # the loop ran other work between slices of the 2000 series


def test_misuse_is_refused() -> None:
    r, c, g, h = make()
    with pytest.raises(ValueError):
        c.labels("f", "200").inc(-1)
    with pytest.raises(ValueError):
        c.labels("f")
    with pytest.raises(ValueError):
        g.observe(1.0)
    with pytest.raises(ValueError):
        Family(r, "gauge", "x_queued", "again")
    with pytest.raises(ValueError):
        Family(r, "histogram", "x_h", "no buckets")
