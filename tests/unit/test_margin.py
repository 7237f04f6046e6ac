"""The gateway's margin per function (:mod:`swapserve.gateway.margin`)."""

from __future__ import annotations

import pytest

from swapserve.gateway.margin import Margins


def test_the_first_answer_sets_it_then_it_moves_up_fast_and_down_slowly() -> None:
    m = Margins()
    assert m.after_ms("f") == 0.0
    m.observe("f", 10.0)
    assert m.after_ms("f") == 10.0
    m.observe("f", 20.0)
    assert m.after_ms("f") == pytest.approx(12.0)  # a fifth of the way up
    m.observe("f", 0.0)
    assert m.after_ms("f") == pytest.approx(11.4)  # a twentieth of the way down
    for bad in (float("nan"), -1.0):
        m.observe("f", bad)
    assert m.after_ms("f") == pytest.approx(11.4)
    assert m.after_ms("g") == 0.0, "each function its own"


def test_it_settles_above_the_mean_of_varying_times() -> None:
    """Answers taking 1 and 9 ms in turn (mean 5): the estimate settles near 7.4, where a fifth of the excess
    of the slow ones balances a twentieth of the shortfall of the quick ones."""
    m = Margins()
    for i in range(2000):
        m.observe("f", 1.0 if i % 2 else 9.0)
    assert 6.5 < m.after_ms("f") < 8.5


def test_a_function_without_answers_takes_the_estimate_of_answers_shaped_as_its() -> None:
    m = Margins()
    m.observe("gpt2-a", 12.0, shape="logits")
    m.observe("tiny", 0.5, shape="small")
    assert m.after_ms("gpt2-b", "logits") == 12.0, "its shape's, learned from another function"
    assert m.after_ms("gpt2-b", "other") == 0.0 and m.after_ms("gpt2-b") == 0.0
    m.observe("gpt2-b", 4.0, shape="logits")
    assert m.after_ms("gpt2-b", "logits") == pytest.approx(11.6), "its own once it has answered, from its shape's"
    assert m.after_ms("gpt2-b") == pytest.approx(11.6)
    assert m.after_ms("gpt2-c", "logits") == pytest.approx(11.6), "the shape's learns from both"
    m.observe("gpt2-d", float("nan"), shape="logits")
    assert m.after_ms("gpt2-d", "logits") == pytest.approx(11.6)


def test_a_function_s_first_slow_answer_moves_it_from_its_shape_s_estimate_not_to_the_answer() -> None:
    """One answer written while the gateway's loop was busy must not hold a function's requests to half their
    SLO for the next fifty answers."""
    m = Margins()
    for i in range(50):
        m.observe(f"classifier-{i}", 0.3, shape="2 KB")
    m.observe("vgg", 9.0, shape="2 KB")
    assert m.after_ms("vgg", "2 KB") == pytest.approx(0.3 + 0.2 * 8.7)
    m.observe("vgg", 0.3, shape="2 KB")
    assert m.after_ms("vgg", "2 KB") < 2.0
