"""``swapserve serve``'s settings: every problem reported at once, devices parsed as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapserve.node.config import ServeConfig, parse_devices


def test_defaults_are_valid(tmp_path: Path) -> None:
    c = ServeConfig(home=tmp_path, token=None)
    assert c.policy == "swapserve" and c.mode == "auto" and c.prepare and c.spin_ms == 0.0


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        ServeConfig(home=tmp_path, token=" ", port=70000, devices=("cpu", "cuda:0", "gpu1"), policy="lifo",
                    mode="turbo", pool_bytes=0, spin_ms=-1.0)
    message = str(e.value)
    for part in ("port 70000", "'gpu1'", "cannot be mixed", "policy 'lifo'", "mode 'turbo'", "pool_bytes must be "
                 "positive", "spin_ms must be in [0, 1000]", "token must not be empty"):
        assert part in message, (part, message)


@pytest.mark.parametrize("spin_ms", [0.0, 2.0, 1000.0])
def test_spin_within_bounds(tmp_path: Path, spin_ms: float) -> None:
    assert ServeConfig(home=tmp_path, token=None, spin_ms=spin_ms).spin_ms == spin_ms


@pytest.mark.parametrize("text, devices", [("", ()), ("all", ()), ("cpu", ("cpu",)), ("0,1", ("cuda:0", "cuda:1")),
                                           ("cpu:0, cpu:1", ("cpu:0", "cpu:1")), ("cuda:3", ("cuda:3",))])
def test_parse_devices(text: str, devices: tuple[str, ...]) -> None:
    assert parse_devices(text) == devices
