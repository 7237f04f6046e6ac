"""A node with several workers (CPU stand-ins for GPUs: ``--devices cpu:0,cpu:1,cpu:2,cpu:3``, a four-GPU
machine's shape): one worker process per device, every device in the status, and work spread over them — with
the controller busy-polling while runs are in flight (``--spin-ms``), which must change nothing but timing, one
lane per device (``--lanes 1``; every other integration test runs the default two) and peer copies allowed
(``--peer-copies``: the workers map each other's pages at start)."""

from __future__ import annotations

import time

import torch

from .harness import assert_stopped_cleanly, concurrently, deploy


def test_one_worker_per_device_and_work_spreads(server_factory, functions, tmp_path):
    s = server_factory(devices="cpu:0,cpu:1,cpu:2,cpu:3",
                       extra=("--spin-ms", "1", "--lanes", "1", "--peer-copies")).start()
    # While the workers start (the port already open), the metrics answer from the node's status.
    answered = []
    while len(answered) < 5 and s.proc.poll() is None:
        try:
            r = s.request("GET", "/metrics", timeout=5)
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        answered.append(r.status)
        if s.request("GET", "/v2/health/ready", timeout=5).status == 200:
            break
    assert answered and set(answered) == {200}, (answered, s.log())
    assert "collector failed" not in s.log(), s.log()  # the status it reads failed (the metrics hide it)
    s.wait_ready()
    assert len(s.worker_pids()) == 4, (s.children, s.log())
    status = s.client().status()
    assert [d["device"] for d in status["devices"]] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert status["extra"]["d2d_GBps"] > 0  # every worker mapped the others' pages at start (peer copies)
    assert s.client().scheduling()["peer_copies"] is True  # as the flag asked
    info = deploy(s, functions.heavy.archive(tmp_path))
    assert info["state"] == "READY"
    x = torch.randn(1, 1024)
    want = functions.heavy.expected(x)

    results = concurrently(9, lambda i: s.client().infer("heavy", {"x": x}))
    for out in results:
        assert not isinstance(out, BaseException), out
        torch.testing.assert_close(out["y"], want[0])
    busy = s.client().status()["extra"]
    used = [k for k, v in busy.items() if k.startswith("busy_seconds_") and v > 0]
    assert len(used) >= 2, busy  # more than one worker ran requests
    assert_stopped_cleanly(s, s.stop())

