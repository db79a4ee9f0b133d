"""The highest rate at which a placement attains its target, by bracketing and bisection."""

from __future__ import annotations

import math
from collections.abc import Callable


def bisect_rate(
    attain: Callable[[float], float],
    target: float,
    guess: float,
    tol: float = 0.05,
    floor: float = 0.0,
    ceiling: float = math.inf,
) -> float:
    """The highest rate with attain(rate) >= target, to a relative tolerance: double or
    halve from `guess` to bracket the crossing, then bisect. 0 if even a trickle misses.

    The answer always lies below every rate seen to miss, so with a `floor` the search
    stops and answers 0 once a rate at or under the floor misses: for a caller to whom
    answers below the floor are all the same. Otherwise the probes, and the answer, are
    those of the search without a floor.

    Likewise with a `ceiling`: the search stops as soon as a rate at or above it attains,
    answering that rate. `lo` only grows, so the full search's answer is at least that
    rate too: for a caller to whom answers above the ceiling are all the same."""
    lo, hi = 0.0, guess
    while attain(hi) >= target:
        lo, hi = hi, hi * 2
        if hi > guess * 1024 or lo >= ceiling:
            return lo
    if hi <= floor:
        return 0.0
    if lo == 0.0:
        probe = hi
        for _ in range(12):
            probe /= 2
            if attain(probe) >= target:
                lo = probe
                if lo >= ceiling:
                    return lo
                break
            if probe <= floor:
                return 0.0
        else:
            return 0.0
        hi = probe * 2
    while (hi - lo) > tol * hi:
        mid = (lo + hi) / 2
        if attain(mid) >= target:
            lo = mid
            if lo >= ceiling:
                return lo
        else:
            hi = mid
            if hi <= floor:
                return 0.0
    return lo
