"""The scheduler: a pure, synchronous decision core (:class:`Scheduler`) over plain-data node state.

The controller owns the :class:`NodeState` and drives the core with the clock passed in (the unit tests
with a fake one); see :mod:`swapserve.scheduler.core` for the policies and
:mod:`swapserve.scheduler.estimate` for the cost model.
"""

from swapserve.scheduler.core import Scheduler
from swapserve.scheduler.estimate import Estimate, View, rate_at, rate_since, update_rate
from swapserve.scheduler.types import (
    Decision, DeviceState, Dispatch, FunctionQueue, LinkProfile, ModelProfile, NodeState, Policy, Queued,
    Reject, Request, SideLane, Source,
)

__all__ = [
    "Decision", "DeviceState", "Dispatch", "Estimate", "FunctionQueue", "LinkProfile", "ModelProfile",
    "NodeState", "Policy", "Queued", "Reject", "Request", "Scheduler", "SideLane", "Source", "View", "rate_at",
    "rate_since", "update_rate",
]
