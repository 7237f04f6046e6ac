"""``swapserve serve``'s settings: every problem reported at once, devices parsed as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from swapserve.cli import UsageError, build_parser, serve_config
from swapserve.node import config
from swapserve.config import env
from swapserve.node.config import SPIN_MS, ServeConfig, listen_address, parse_devices


def test_defaults_are_valid(tmp_path: Path) -> None:
    c = ServeConfig(home=tmp_path, token=None)
    assert c.policy == "swapserve" and c.mode == "auto" and c.prepare and c.spin_ms is None and c.lanes == 2


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        ServeConfig(home=tmp_path, token=" ", port=70000, devices=("cpu", "cuda:0", "gpu1"), policy="lifo",
                    mode="turbo", pool_bytes=0, spin_ms=-1.0, sandbox_isolation="maybe", lanes=5, fronts=65)
    message = str(e.value)
    for part in ("port 70000", "'gpu1'", "cannot be mixed", "policy 'lifo'", "mode 'turbo'", "pool_bytes must be "
                 "positive", "spin_ms must be in [0, 1000]", "token must not be empty", "sandbox_isolation 'maybe'",
                 "lanes must be 1 to 4, not 5", "fronts must be in 0..64"):
        assert part in message, (part, message)


def test_serve_flags_become_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--home", str(tmp_path), "--devices", "cpu:0,cpu:1", "--port", "9001",
                                      "--policy", "fifo_lru", "--no-prepare", "--spin-ms", "1.5",
                                      "--sandbox-isolation", "strict", "--sandbox-idle-s", "30", "--lanes", "1",
                                      "--fronts", "3", "--queue-ahead-within-ms", "2", "--peer-copies",
                                      "--slo-values"])
    c = serve_config(args)
    assert c.lanes == 1 and c.fronts == 3 and c.queue_ahead_within_ms == 2.0 and c.peer_copies and c.slo_values
    assert (c.home, c.devices, c.port, c.policy, c.prepare, c.spin_ms) == (tmp_path, ("cpu:0", "cpu:1"), 9001,
                                                                           "fifo_lru", False, 1.5)
    assert (c.sandbox_isolation, c.sandbox_idle_s) == ("strict", 30.0)
    defaults = serve_config(build_parser().parse_args(["serve", "--home", str(tmp_path)]))
    assert (defaults.sandbox_isolation, defaults.sandbox_idle_s, defaults.spin_ms) == ("best_effort", 300.0, None)
    assert defaults.fronts == 0  # the controller serves HTTP itself unless asked
    assert defaults.queue_ahead_within_ms is None  # queue ahead whenever, unless asked
    assert defaults.peer_copies is None  # the node decides by its devices (resolved_peer_copies)
    assert not defaults.slo_values  # off until a trace on a GPU shows it helps
    with pytest.raises(UsageError, match="queue_ahead_within_ms must be in"):
        serve_config(build_parser().parse_args(["serve", "--home", str(tmp_path), "--queue-ahead-within-ms", "-1"]))
    with pytest.raises(UsageError, match="fronts need a given port"):
        serve_config(build_parser().parse_args(["serve", "--home", str(tmp_path), "--port", "0", "--fronts", "2"]))
    with pytest.raises(UsageError, match="sandbox_idle_s must be positive"):
        serve_config(build_parser().parse_args(["serve", "--home", str(tmp_path), "--sandbox-idle-s", "0"]))


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """``monkeypatch`` for ``SWAPSERVE_*``: :func:`swapserve.config.env` reads them once, so its cache is emptied
    around the test."""
    env.cache_clear()
    for name in ("SWAPSERVE_URL", "SWAPSERVE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    env.cache_clear()


def serve_args(tmp_path: Path, *flags: str) -> ServeConfig:
    return serve_config(build_parser().parse_args(["serve", "--home", str(tmp_path), *flags]))


def test_serve_listens_where_swapserve_url_points_and_takes_swapserve_token(
        tmp_path: Path, environ: pytest.MonkeyPatch) -> None:
    c = serve_args(tmp_path)
    assert (c.host, c.port, c.token) == ("127.0.0.1", 8000, None)  # nothing set: the CLI's default URL
    env.cache_clear()
    environ.setenv("SWAPSERVE_URL", "http://0.0.0.0:9123/")
    environ.setenv("SWAPSERVE_TOKEN", "s3cret")
    c = serve_args(tmp_path)
    assert (c.host, c.port, c.token) == ("0.0.0.0", 9123, "s3cret")
    assert (serve_args(tmp_path, "--port", "9001").host, serve_args(tmp_path, "--port", "9001").port) == \
        ("0.0.0.0", 9001)  # a flag given wins over the environment, the other part still comes from it
    assert serve_args(tmp_path, "--host", "127.0.0.1").port == 9123
    assert serve_args(tmp_path, "--token", "other").token == "other"


@pytest.mark.parametrize("url, address", [("http://localhost", ("localhost", 80)), ("http://[::1]:81", ("::1", 81)),
                                          ("http://node.example:8000", ("node.example", 8000))])
def test_listen_address(url: str, address: tuple[str, int]) -> None:
    assert listen_address(url) == address


@pytest.mark.parametrize("url, message", [
    ("https://node.example", "not an address the node can listen at"),
    ("http://node.example:8000/swapserve", "not an address the node can listen at"),
    ("node.example:8000", "not an address the node can listen at"),
    ("http://node.example:99999", "is not a URL")])
def test_a_swapserve_url_serve_cannot_listen_at_is_a_usage_error(
        tmp_path: Path, environ: pytest.MonkeyPatch, url: str, message: str) -> None:
    environ.setenv("SWAPSERVE_URL", url)
    with pytest.raises(UsageError, match=message):
        serve_args(tmp_path)
    c = serve_args(tmp_path, "--host", "0.0.0.0", "--port", "8080")  # both given: the URL is not needed
    assert (c.host, c.port) == ("0.0.0.0", 8080)


def test_body_and_upload_limits(tmp_path: Path) -> None:
    defaults = serve_args(tmp_path)
    assert (defaults.max_body_bytes, defaults.max_upload_bytes) == (64 << 20, 8 << 30)
    c = serve_args(tmp_path, "--max-body", "1MiB", "--max-upload", "2GiB")
    assert (c.max_body_bytes, c.max_upload_bytes) == (1 << 20, 2 << 30)
    with pytest.raises(UsageError, match="max_body_bytes must be positive"):
        serve_args(tmp_path, "--max-body", "0")


@pytest.mark.parametrize("spin_ms", [0.0, 2.0, 1000.0])
def test_spin_within_bounds(tmp_path: Path, spin_ms: float) -> None:
    assert ServeConfig(home=tmp_path, token=None, spin_ms=spin_ms).spin_ms == spin_ms


@pytest.mark.parametrize("devices, cores, spin_ms", [
    (("cuda:0",), 16, SPIN_MS), (("cuda:0",), 7, SPIN_MS), (("cuda:0",), 6, 0.0),
    (("cuda:0", "cuda:1", "cuda:2", "cuda:3"), 16, SPIN_MS), (("cuda:0", "cuda:1", "cuda:2", "cuda:3"), 15, 0.0),
    (("cpu",), 64, 0.0), (("cpu:0", "cpu:1"), 64, 0.0)])
def test_the_controller_polls_by_default_on_gpu_nodes_with_cores_to_spare(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: tuple[str, ...], cores: int, spin_ms: float) -> None:
    monkeypatch.setattr(config, "usable_cores", lambda: cores)
    assert ServeConfig(home=tmp_path, token=None).resolved_spin_ms(devices) == spin_ms
    assert ServeConfig(home=tmp_path, token=None, spin_ms=0.0).resolved_spin_ms(devices) == 0.0  # asked: off
    assert ServeConfig(home=tmp_path, token=None, spin_ms=2.0).resolved_spin_ms(devices) == 2.0
    with_fronts = ServeConfig(home=tmp_path, token=None, fronts=4).resolved_spin_ms(devices)  # a core each
    assert with_fronts == (SPIN_MS if spin_ms and cores >= 4 + 3 * len(devices) + 4 else 0.0)


@pytest.mark.parametrize("gpus", [0, 1, 2, 4, 8])
def test_every_visible_gpu_is_a_device_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    """The node starts one worker per entry of ``resolved_devices``: with no ``--devices``, one per GPU torch
    sees, whatever their number (a four-GPU machine: cuda:0 to cuda:3), and the CPU where there is none."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    want = tuple(f"cuda:{i}" for i in range(gpus)) or ("cpu",)
    assert ServeConfig(home=tmp_path, token=None).resolved_devices() == want
    assert ServeConfig(home=tmp_path, token=None, devices=("cuda:1",)).resolved_devices() == ("cuda:1",)  # asked


@pytest.mark.parametrize("devices, peer_copies", [
    (("cuda:0",), False), (("cuda:0", "cuda:1"), True), (("cuda:0", "cuda:1", "cuda:2", "cuda:3"), True),
    (("cpu",), False), (("cpu:0", "cpu:1"), False)])
def test_peer_copies_by_default_on_nodes_of_several_gpus(tmp_path: Path, devices: tuple[str, ...],
                                                         peer_copies: bool) -> None:
    assert ServeConfig(home=tmp_path, token=None).resolved_peer_copies(devices) is peer_copies
    for asked in (False, True):
        assert ServeConfig(home=tmp_path, token=None, peer_copies=asked).resolved_peer_copies(devices) is asked


@pytest.mark.parametrize("text, devices", [("", ()), ("all", ()), ("cpu", ("cpu",)), ("0,1", ("cuda:0", "cuda:1")),
                                           ("cpu:0, cpu:1", ("cpu:0", "cpu:1")), ("cuda:3", ("cuda:3",))])
def test_parse_devices(text: str, devices: tuple[str, ...]) -> None:
    assert parse_devices(text) == devices


def test_a_generated_token_can_be_given_back_as_a_flag(tmp_path: Path) -> None:
    from swapserve.node.serve import new_token

    tokens = [new_token() for _ in range(2000)]  # base64url starts with '-' a 64th of the time
    assert len(set(tokens)) == len(tokens) and not any(t.startswith("-") for t in tokens)
    for token in tokens[:50]:
        args = build_parser().parse_args(["serve", "--home", str(tmp_path), "--token", token])
        assert serve_config(args).token == token
