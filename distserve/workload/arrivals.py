"""Arrival processes: Poisson at a rate, Gamma with a coefficient of variation (bursts),
or given times (a trace)."""

from __future__ import annotations

import math
import random


def arrival_times(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> list[float]:
    """Times of `n` arrivals at mean `rate` per second, starting at 0.

    Inter-arrival gaps are Gamma distributed with mean 1/rate and coefficient of variation
    `cv` (cv = 1 is Poisson; cv > 1 is burstier). rate = inf sends everything at once."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not cv > 0:
        raise ValueError(f"burstiness (cv) must be > 0, got {cv}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    t, times = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(shape, scale)
        times.append(t)
    return times
