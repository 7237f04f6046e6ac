"""The ``swapserve`` client commands no other test runs, as a user runs them against the real node: ``invoke``
with tensors (``--random``, ``--input`` from JSON lists and .npy files, binary and JSON), ``rm``, and ``status``.

Each command is the console script in a subprocess, configured by ``SWAPSERVE_URL``/``SWAPSERVE_TOKEN``
(``Server.cli``), on the session's shared node; printed answers are checked against the models run here.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from .harness import Functions, Server, assert_serves, deploy, infer_json

pytestmark = pytest.mark.integration

OUTPUT_LINE = re.compile(r"(?P<name>\w+): (?P<dtype>\w+) (?P<shape>\[[\d, ]*\]) (?P<values>\[[^\]]*\])"
                         r"(?P<more> \.\.\.)?")


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once it succeeded."""
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def failed(done: subprocess.CompletedProcess[str]) -> str:
    """The message of a command refused as ``swapserve: ...`` (no traceback) with exit code 2, nothing on stdout."""
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stdout == "" and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    last = done.stderr.splitlines()[-1]
    assert last.startswith("swapserve: "), done.stderr
    return last


def assert_printed(stdout: str, wire: str, want: dict[str, torch.Tensor]) -> None:
    """``invoke`` printed exactly the outputs ``want``, in order, each as its dtype, shape, first 6 values (rounded
    to 5 decimals) and " ..." after them when there are more; then the latency over ``wire`` ("binary"/"JSON")."""
    *lines, latency = stdout.splitlines()
    assert re.fullmatch(rf"latency: \d+\.\d\d ms \(round trip, {wire} tensors\)", latency), stdout
    assert len(lines) == len(want), stdout
    for line, (name, t) in zip(lines, want.items()):
        m = OUTPUT_LINE.fullmatch(line)
        assert m is not None, f"not an output line: {line!r}"
        assert (m["name"], m["dtype"], ast.literal_eval(m["shape"]), bool(m["more"])) == \
            (name, "float32", list(t.shape), t.numel() > 6), stdout
        torch.testing.assert_close(torch.tensor(ast.literal_eval(m["values"])), t.reshape(-1)[:6], rtol=0, atol=1e-5)


def test_invoke_random_prints_the_models_answer(server: Server, functions: Functions) -> None:
    """``--random`` sends seeded random inputs of the declared shapes at batch 1 (floats normal, integers 0 or 1,
    drawn in the declared order): what it prints is the model's answer to them."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal([1, 8]).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, 2, [1, 3]).astype(np.int64))
    y, z = functions.pair.expected(x, ids)
    assert_printed(ok(server.cli("invoke", "pair", "--random", "--seed", "3")), "binary", {"y": y, "z": z})


def test_invoke_inputs_from_json_lists_and_npy_files(server: Server, functions: Functions, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(11)
    # A batch of 3 from a float64 .npy file (cast to the declared FP32), over JSON: 12 values, 6 of them printed.
    x = torch.randn(3, 16, generator=g)
    np.save(tmp_path / "x.npy", x.double().numpy())
    (y,) = functions.mlp.expected(x)
    assert_printed(ok(server.cli("invoke", "mlp", "--input", f"x={tmp_path / 'x.npy'}", "--json")), "JSON", {"y": y})

    # One row as a JSON list without its batch dimension, beside int32 token ids from a .npy (cast to INT64).
    x = torch.randn(8, generator=g)
    ids = torch.tensor([[9, 0, 4]])
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    y, z = functions.pair.expected(x[None], ids)
    done = server.cli("invoke", "pair", "--input", f"x={json.dumps(x.tolist())}",
                      "--input", f"ids={tmp_path / 'ids.npy'}")
    assert_printed(ok(done), "binary", {"y": y, "z": z})


def test_invoke_refuses_inputs_it_cannot_send(server: Server, tmp_path: Path) -> None:
    """Usage errors, before any request: one line each, exit code 2."""
    assert "missing inputs ['x', 'ids']: give --input NAME=... for each, or --random" in failed(
        server.cli("invoke", "pair"))
    assert "--input y: mlp has no input 'y' (inputs: x)" in failed(server.cli("invoke", "mlp", "--input", "y=[1]"))
    assert "expected NAME=FILE.npy or NAME=JSONLIST" in failed(server.cli("invoke", "mlp", "--input", "x"))
    missing = tmp_path / "missing.npy"
    assert f"--input x: cannot read {missing}" in failed(server.cli("invoke", "mlp", "--input", f"x={missing}"))


def test_rm_removes_a_function(server: Server, functions: Functions, tmp_path: Path) -> None:
    info = deploy(server, functions.mlp.variant(tmp_path, name="cli-rm"))
    assert (info["name"], info["state"]) == ("cli-rm", "READY"), info
    assert_serves(server, functions.mlp, name="cli-rm")
    assert "cli-rm" in listed(server)

    assert ok(server.cli("rm", "cli-rm")) == "deleted cli-rm\n"
    assert "cli-rm" not in listed(server)
    assert {"mlp", "pair"} <= listed(server)
    assert "cli-rm" not in resident(ok(server.cli("status")))
    assert "cli-rm" in infer_json(server, "cli-rm", {"x": torch.randn(1, 16)}).error(404)
    assert "(HTTP 404)" in failed(server.cli("invoke", "cli-rm", "--random"))
    assert_serves(server, functions.mlp)


def test_rm_of_an_unknown_function_fails(server: Server) -> None:
    message = failed(server.cli("rm", "no-such-function"))
    assert "no-such-function" in message and message.endswith("(HTTP 404)"), message
    assert {"mlp", "pair"} <= listed(server)


def test_status_shows_devices_pool_and_resident_models(server: Server, functions: Functions) -> None:
    """After a request to ``mlp`` its model is resident on the node's one device (cpu), as the status says."""
    assert_serves(server, functions.mlp)
    out = ok(server.cli("status"))
    s = server.client().status()
    (dev,) = s["devices"]
    lines = out.splitlines()
    assert lines[0] == f"node: ready, {s['functions']} functions, 0 requests queued" and s["functions"] >= 2, out
    assert re.fullmatch(r"host store: \d+\.\d (KiB|MiB) of 256\.0 MiB", lines[1]), out
    assert re.fullmatch(rf"cpu \({re.escape(dev['name'])}\): pool \d+\.\d (KiB|MiB) of 128\.0 MiB", lines[2]), out
    assert dev["pool_used_bytes"] >= 1024
    assert "mlp" in resident(out)
    assert resident(out) == dev["resident"], (out, dev)


def listed(server: Server) -> set[str]:
    """The names ``swapserve ls`` lists."""
    header, *rows = ok(server.cli("ls")).splitlines()
    assert header.split() == ["NAME", "VERSION", "STATE", "SLO_MS", "MAX_BATCH", "WEIGHTS"], header
    return {row.split()[0] for row in rows}


def resident(status_out: str) -> list[str]:
    """The models ``swapserve status`` shows resident on its one device."""
    (line,) = [line for line in status_out.splitlines() if line.startswith("  resident: ")]
    return line.removeprefix("  resident: ").split("; ")[0].split(", ")
