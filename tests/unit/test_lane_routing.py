"""Which connection a command to a worker goes on (:func:`swapserve.node.workers.direct`): a side lane's run
that carries no eviction values and copies from no peer goes on that lane's own pipe; everything else on the
worker's main connection, whose receiver applies the values in the order they were sent."""

from __future__ import annotations

from swapserve.node.messages import Evict, Prefetch, Run, TensorRef
from swapserve.node.workers import direct

REFS = (TensorRef(0, "float32", (1, 4)),)


def _run(**kw: object) -> Run:
    return Run(1, "m", REFS, 256, **kw)  # type: ignore[arg-type]


def test_a_plain_side_lane_run_goes_on_its_lanes_pipe() -> None:
    assert direct(_run(lane=1)) == 1
    assert direct(_run(lane=2)) == 2
    assert direct(_run(lane=1, fetch=True)) == 1  # a fetch of a whole model evicts nothing; values stay in order


def test_runs_with_values_a_peer_or_for_lane_0_and_other_commands_go_on_the_main_connection() -> None:
    assert direct(_run(lane=1, values={"x": 0.5})) == 0
    assert direct(_run(lane=1, peer=0, peer_pages=(3,))) == 0
    assert direct(_run(lane=0)) == 0
    assert direct(Prefetch(1, "m")) == 0
    assert direct(Evict(1, "m")) == 0
