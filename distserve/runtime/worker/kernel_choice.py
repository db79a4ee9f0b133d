"""Up to how many rows a worker takes the packed bf16 kernels (`model/packed.py`),
chosen on whole decode steps of the real model at worker start.

A decode step of b requests runs every linear layer on b rows. The packed kernel streams
each weight once per call and wins at few rows; torch's path (oneDNN, AMX where the CPU
has it) wins once there are rows to fill the matrix units. Where they cross depends on
the CPU, the thread count and on the weights coming from memory rather than cache, so it
is measured here, on the steps the worker will run, once per worker."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from distserve.core import StepPlan
from distserve.model.packed import RowLimits
from distserve.runtime.worker.synthetic import SyntheticPlans
from distserve.timing import best_time

PROBES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 128
"""Tokens of KV per request in a probe step: attention is the same on both paths."""


def choose_kernel_rows(
    execute: Callable[[StepPlan], object],
    plans: SyntheticPlans,
    limits: RowLimits,
    reps: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, dict[int, tuple[float, float]]]:
    """Time a decode step of b requests with the kernels and without, for b in PROBES
    until torch wins, then bisect between the last win and the first loss; set the
    largest b at which the kernels still won as the model's limit (`limits`: the
    `RowLimits` of the model that `execute` runs) and return it with the timings
    {b: (kernels, torch)}. sys.maxsize: the kernels won at every probe. A batch the cache
    has no room for is not tried: the limit stays at the largest batch that was."""
    timings: dict[int, tuple[float, float]] = {}

    def kernels_win(b: int) -> bool:
        plan = plans.decode(b, CONTEXT)
        try:
            limits.model_rows = sys.maxsize
            on = best_time(lambda: execute(plan), reps, clock=clock)  # noqa: B023
            limits.model_rows = 0
            off = best_time(lambda: execute(plan), reps, clock=clock)  # noqa: B023
        finally:
            plans.release()
        timings[b] = (on, off)
        return on < off

    room = plans.blocks.num_free_blocks // (CONTEXT // plans.blocks.block_size + 1)
    lo, hi = 0, None
    for b in PROBES:
        if b > room:
            hi = lo + 1  # untried: stop at what was
            break
        if not kernels_win(b):
            hi = b
            break
        lo = b
    if hi is None:
        lo = sys.maxsize
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if kernels_win(mid):
                lo = mid
            else:
                hi = mid
    limits.model_rows = lo
    return lo, timings
