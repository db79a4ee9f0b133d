"""Goodput from a rate sweep's (rate, attainment) points, and its bootstrap interval."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """The highest rate whose attainment stays >= target, from (rate, attainment) points:
    the last rate before attainment first falls below target, linearly interpolated to
    where the line between the two crosses target (as the DistServe paper does). If even
    the lowest rate misses, 0; if no rate misses, the highest rate measured (a lower bound)."""
    pts = sorted(points)
    if not pts or pts[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return pts[-1][0]


def goodput_interval(
    runs: Sequence[tuple[float, Sequence[bool]]],
    target: float = 0.9,
    level: float = 0.9,
    draws: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval of `goodput` over a sweep: each rate's per-request outcomes
    (met both targets or not, in arrival order) resampled in circular blocks of
    ceil(sqrt(n)) consecutive requests (a queue makes neighbours miss together), the
    goodput recomputed per draw, and the central `level` share of the draws. It covers
    the sample's own noise only, not the machine's speed moving between rates: at 60
    requests a rate and a flat attainment curve, one request is 1.7 points and can move
    the goodput by 10% or more."""
    rng = random.Random(seed)
    # per rate: its outcomes, block length and blocks per draw
    shapes = []
    for rate, met in runs:
        b = math.ceil(math.sqrt(len(met))) or 1
        shapes.append((rate, met, b, math.ceil(len(met) / b)))
    values = []
    for _ in range(draws):
        points = []
        for rate, met, b, blocks in shapes:
            n = len(met)
            if n == 0:
                points.append((rate, 0.0))
                continue
            hits = 0
            for _ in range(blocks):
                start = rng.randrange(n)
                hits += sum(met[(start + j) % n] for j in range(b))
            points.append((rate, hits / (b * blocks)))
        values.append(goodput(points, target))
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * (draws - 1))], values[math.ceil((1 - tail) * (draws - 1))]
