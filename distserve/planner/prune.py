"""Which search jobs may stop early, chosen so that the search's answer is the exhaustive
search's: a job stops only once no layout containing it can beat the best one found.

Each job's goodput is found by bisection, whose answer lies below every rate seen to
miss (`phases.bisect_rate`). Before a job starts, the search gives it a *floor*: a rate
such that, at or below it, the shape is part of nothing better than the best layout
scored so far. Its bisection stops (goodput 0) once a rate at or under the floor misses;
a floor of infinity skips it. The analytic estimates (estimates.py) cannot serve here: a
decode shape's goodput was up to 2.1x its estimate (a finite run absorbs overload).

Why this loses nothing: take the exhaustive search's best layout and the first of its
members to be stopped. When its floor was set, its partner was either scored exactly or
not yet scored (counted as infinitely fast), and the best so far was a layout of scored
goodputs, at most the exhaustive one. So at the member's true goodput the layout beats or
ties that best, its goodput is above its floor, and its bisection does not stop.

Ceilings, for the same search: decode jobs wait until every prefill job is done (prefill
jobs simulate one-token outputs and are cheap), so they start with exact partners. Then n
of decode job i's instances beside m prefill instances of goodput g give min(n x, m g),
where m g is at most g times the prefill instances that fit beside one of job i's: above
that rate (its *ceiling*) job i's exact goodput changes no layout's goodput, and its
bisection stops at the first rate at or above it that attains (`bisect_rate`). No floor
is set from a capped goodput: every partner's floor was set before.
"""

from __future__ import annotations

import math

from distserve.planner.phases import InstanceConfig

Key = tuple[float, float]
_SLACK = 1e-9  # floors sit this much (relative) below the exact threshold: float safety


def combination_key(goodput: float, devices: int, rate: float | None) -> Key:
    """What `search.best_combination` maximizes: per-device goodput (ties: fewer
    devices), or with a target rate, the fewest devices (ties: per-device goodput)."""
    per_device = goodput / devices
    return (-devices, per_device) if rate is not None else (per_device, -devices)


def pair_best(
    gp: float, dp: int, gd: float, dd: int, devices: int, rate: float | None
) -> tuple[Key, int, int] | None:
    """The best (key, n, m) of n prefill (goodput gp, dp devices each) + m decode instances
    within `devices`; the first of equal keys, n then m ascending. None if none fits
    (or, with a target rate, none sustains it)."""
    best: tuple[Key, int, int] | None = None
    for n in range(1, devices // dp + 1):
        for m in range(1, (devices - n * dp) // dd + 1):
            g = min(n * gp, m * gd)
            if rate is not None and g < rate:
                continue
            key = combination_key(g, n * dp + m * dd, rate)
            if best is None or key > best[0]:
                best = (key, n, m)
    return best


class ShapeFloors:
    """Floors for a search that keeps the one shape of best goodput per device (the
    colocated baselines): a shape matters only above the best per device so far."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.best = 0.0

    def ready(self, i: int) -> bool:
        return True

    def ceiling(self, i: int) -> float:
        return math.inf

    def record(self, i: int, goodput: float, capped: bool = False) -> None:
        self.best = max(self.best, goodput / self.devices[i])

    def floor(self, i: int) -> float:
        # at or under it the shape's goodput per device is below the best: it loses
        return self.best * self.devices[i] * (1 - _SLACK)


class PairFloors:
    """Floors for Algorithm 1: jobs are (shape, 'prefill' | 'decode'); the answer is the
    best combination of n prefill and m decode instances within `devices`."""

    def __init__(
        self, jobs: list[tuple[InstanceConfig, str]], devices: int, rate: float | None
    ) -> None:
        self.jobs, self.devices, self.rate = jobs, devices, rate
        self.goodput: dict[int, float] = {}
        self.skipped: set[int] = set()
        self.capped: set[int] = set()
        """Jobs whose goodput is a lower bound, at or above their ceiling."""
        self.best: Key | None = None

    def record(self, i: int, goodput: float, capped: bool = False) -> None:
        self.goodput[i] = goodput
        if capped:
            self.capped.add(i)
        inst, role = self.jobs[i]
        for j, g in self._partners(role):
            if g == math.inf or g <= 0:
                continue
            pair = (goodput, inst.devices, g, self.jobs[j][0].devices)
            if role == "decode":
                pair = (g, self.jobs[j][0].devices, goodput, inst.devices)
            found = pair_best(*pair, self.devices, self.rate) if goodput > 0 else None
            if found is not None and (self.best is None or found[0] > self.best):
                self.best = found[0]

    def ready(self, i: int) -> bool:
        """Whether job i should start now: decode jobs wait for every prefill job (cheap:
        one-token outputs), so that they start with a ceiling."""
        return self.jobs[i][1] == "prefill" or all(
            j in self.goodput or j in self.skipped
            for j, (_, r) in enumerate(self.jobs)
            if r == "prefill"
        )

    def ceiling(self, i: int) -> float:
        """A rate above which job i's goodput changes no layout: once every partner is
        scored (or skipped), n of job i's instances beside m partners of goodput g give
        min(n x, m g), and m g never exceeds g times the partners that fit beside one of
        job i's instances. Infinity while a partner is unscored, or was itself capped."""
        inst, role = self.jobs[i]
        top = 0.0
        for j, g in self._partners(role):
            if g == math.inf or j in self.capped:
                return math.inf
            dp = self.jobs[j][0].devices
            top = max(top, g * ((self.devices - inst.devices) // dp))
        return top if top > 0 else math.inf

    def floor(self, i: int) -> float:
        """The rate at or under which job i is part of no layout that beats the best so
        far; infinity (and the job is skipped) if it is part of none at any rate."""
        inst, role = self.jobs[i]
        need = math.inf
        for j, g in self._partners(role):
            if g <= 0:
                continue
            dp = self.jobs[j][0].devices
            for n in range(1, (self.devices - dp) // inst.devices + 1):
                # for a fixed n, the fewest partners that qualify ask the least of job i
                for m in range(1, (self.devices - n * inst.devices) // dp + 1):
                    rate = self._needed(g, n, inst.devices, m, dp)
                    if rate is not None:
                        need = min(need, rate)
                        break
        if need == math.inf:
            self.skipped.add(i)
        return need * (1 - _SLACK)

    def _needed(self, g: float, n: int, d: int, m: int, dp: int) -> float | None:
        """The goodput that n of job i's instances (d devices each) beside m partners (g
        each, dp devices) need to beat the best; None if the partners cannot."""
        total = n * d + m * dp
        if self.rate is None:
            if self.best is None:
                return 0.0
            target = self.best[0] * total  # the best per device, on these devices
        else:
            target = self.rate
            if self.best is not None:
                if total > -self.best[0]:
                    return None
                if total == -self.best[0]:
                    target = max(target, self.best[1] * total)
        return target / n if m * g >= target * (1 - _SLACK) else None

    def _partners(self, role: str) -> list[tuple[int, float]]:
        """Jobs of the other role still in play, with their goodput (infinity if not
        yet scored: they may be as fast as anything)."""
        other = "decode" if role == "prefill" else "prefill"
        return [
            (j, self.goodput.get(j, math.inf))
            for j, (_, r) in enumerate(self.jobs)
            if r == other and j not in self.skipped
        ]
