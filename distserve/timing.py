"""Timing a call the way the kernel choices and benchmarks need it: the best of a few
repetitions after a warm-up (the fastest run is the one the machine disturbed least)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(
    fn: Callable[[], object],
    reps: int,
    warm_up: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of the fastest of `reps` calls of `fn`, after one untimed call."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best
