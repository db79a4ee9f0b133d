"""The highest rate at which a placement attains its target, by bracketing and bisection."""

from __future__ import annotations

import math
from collections.abc import Callable

NEAR = 0.9
"""Until a rate above the floor has missed, one within this fraction of the floor is
simulated at once rather than taken: a search whose first probe lands just under the
floor would otherwise climb to the floor through misses near it, each run nearly whole."""


class _Below(Exception):
    """A rate at or under the floor missed: the answer is under the floor."""


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

    With a `floor`, for a caller to whom answers at or below it are all the same: the
    answer is the search's without a floor, or 0 where that is at or below the floor.
    A rate at or under the floor is not simulated when the search reaches it: it is taken
    to attain, and checked only if the answer comes out above the floor. If it did attain,
    the search went as it would have; if not, the search without a floor would have gone
    below it, so its answer is under the floor (0). Passing probes run whole, failing ones
    stop early: the probes below a floor were over a quarter of a plan's simulation.
    (Near the floor, before any miss, a rate is simulated at once: NEAR. A miss there
    answers 0 at once, for the same reason.)

    Likewise with a `ceiling`: the search stops as soon as a rate at or above it attains,
    answering that rate. `lo` only grows, so the full search's answer is at least that
    rate too: for a caller to whom answers above the ceiling are all the same."""
    taken: list[float] = []  # rates under the floor taken to attain, unsimulated
    missed = False  # whether a rate above the floor has missed

    def attains(rate: float) -> bool:
        nonlocal missed
        if rate <= floor and (missed or rate < NEAR * floor):
            taken.append(rate)
            return True
        if attain(rate) >= target:
            return True
        if rate <= floor:
            raise _Below
        missed = True
        return False

    try:
        found = _bisect(attains, guess, tol, ceiling)
    except _Below:
        return 0.0
    if found <= floor:
        return 0.0
    if any(attain(rate) < target for rate in taken):
        return 0.0
    return found


def _bisect(attains: Callable[[float], bool], guess: float, tol: float, ceiling: float) -> float:
    """The search itself, on a verdict per rate."""
    lo, hi = 0.0, guess
    while attains(hi):
        lo, hi = hi, hi * 2
        if hi > guess * 1024 or lo >= ceiling:
            return lo
    if lo == 0.0:
        probe = hi
        for _ in range(12):
            probe /= 2
            if attains(probe):
                lo = probe
                if lo >= ceiling:
                    return lo
                break
        else:
            return 0.0
        hi = probe * 2
    while (hi - lo) > tol * hi:
        mid = (lo + hi) / 2
        if attains(mid):
            lo = mid
            if lo >= ceiling:
                return lo
        else:
            hi = mid
    return lo
