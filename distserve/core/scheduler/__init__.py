"""Schedulers: one per instance role, all driven by the same step contract

    plan = scheduler.schedule(now)
    result = executor.execute(plan)
    outputs = scheduler.update(plan, result, now)

`now` is the only clock they read: the wall clock in the real engine, a virtual one in
the simulator.
"""

from distserve.core.scheduler.base import Scheduler, StepOutput
from distserve.core.scheduler.colocated import ColocatedScheduler
from distserve.core.scheduler.decode import DecodeScheduler
from distserve.core.scheduler.prefill import PrefillScheduler

__all__ = ["ColocatedScheduler", "DecodeScheduler", "PrefillScheduler", "Scheduler", "StepOutput"]
