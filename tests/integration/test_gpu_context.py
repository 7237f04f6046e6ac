"""On a GPU, the real ``swapserve serve``: its worker holds the only CUDA context on the GPU among the node's
processes (the controller and the gateway never touch CUDA), and the link profile the scheduler plans with was
measured on the machine at start — copy bandwidth, a run's slowdown under a copy and beside another run — not
taken as assumed (a CPU node reports no slowdown beside: nothing is measured there)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from .harness import assert_stopped_cleanly, cmdline, deploy

pytestmark = [pytest.mark.integration, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], check=True,
                         capture_output=True, text=True).stdout
    return {int(line) for line in out.split() if line.strip().isdigit()}


def test_the_worker_holds_the_only_context_and_the_link_is_measured(server_factory, functions, tmp_path):
    s = server_factory(devices="cuda:0").start()
    s.wait_ready()
    assert deploy(s, functions.heavy.archive(tmp_path))["state"] == "READY"
    x = torch.randn(1, 1024)
    torch.testing.assert_close(s.client().infer("heavy", {"x": x})["y"], functions.heavy.expected(x)[0])

    node = {s.pid, *s.children}
    workers = s.worker_pids()
    assert len(workers) == 1, {p: cmdline(p) for p in node}
    assert _gpu_pids() & node == workers, (_gpu_pids(), {p: cmdline(p) for p in node})

    extra = s.client().status()["extra"]
    assert extra["h2d_GBps"] > 5 and extra["h2d_GBps_all_copying"] > 5, extra  # PCIe 4/5 or NVLink-C2C
    assert 1.0 <= extra["exec_slowdown_copying"] < 4, extra
    assert 1.0 <= extra["exec_slowdown_beside_1"] < 4, extra  # two lanes by default: one run beside another
    assert_stopped_cleanly(s, s.stop())
