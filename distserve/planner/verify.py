"""Verification: the chosen placement's goodput, simulated jointly (both targets at once)
rather than assembled from its phases' separate goodputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from distserve.planner.phases import Setting, placement_goodput
from distserve.planner.prune import ShapeFloors
from distserve.planner.search import Choice

JOINT_UP_TO = 4
"""Placements of at most this many instances are simulated whole."""


def verify(setting: Setting, c: Choice, floor: float = 0.0) -> float:
    """Goodput of the placement, simulated jointly (both targets). A small placement (up
    to JOINT_UP_TO instances) is simulated whole: two colocated CPU instances behind one
    router did 1.4x better than twice one instance at half the rate (one queue pools
    them), and only a whole simulation sees their contention. A larger placement of k
    equal copies (k = the gcd of its instance counts) is simulated as one copy and scaled
    by k, a lower bound that simulates k times faster. `floor`: 0 where the goodput is at
    or below it (bisect_rate's floor). The search starts near the goodput the choice
    carries (its phases', or its single instance's): see placement_goodput's `near`."""
    if c.colocated is not None:
        k = c.num_colocated if c.num_colocated > JOINT_UP_TO else 1
        return k * placement_goodput(
            setting,
            None,
            None,
            colocated=c.colocated,
            num_colocated=c.num_colocated // k,
            chunked=c.chunked,
            floor=floor / k,
            near=c.goodput / k or None,
        )
    k = math.gcd(c.num_prefill, c.num_decode)
    if c.num_prefill + c.num_decode <= JOINT_UP_TO:
        k = 1
    return k * placement_goodput(
        setting,
        c.prefill,
        c.decode,
        num_prefill=c.num_prefill // k,
        num_decode=c.num_decode // k,
        floor=floor / k,
        near=c.goodput / k or None,
    )


def verify_candidates(setting: Setting, choices: Sequence[Choice]) -> list[tuple[float, float]]:
    """(verified goodput, floor) of each candidate placement, of which only the best per
    device is kept: one at a time, each with the floor that the best verified so far sets
    (prune.ShapeFloors: its per-device goodput times the candidate's devices), so that one
    that cannot win stops early (goodput 0 below that floor). The winner, and its goodput,
    are what verifying each in full would give. The largest placement by its phases'
    goodput goes first, a cost heuristic only: the sooner the winner is verified, the
    sooner the rest stop (on OPT-66B x 32 chatbot the largest was the winner)."""
    floors = ShapeFloors([c.devices for c in choices])
    out = [(0.0, 0.0)] * len(choices)
    for i in sorted(range(len(choices)), key=lambda i: -choices[i].goodput):
        floor = floors.floor(i)
        out[i] = (verify(setting, choices[i], floor), floor)
        floors.record(i, out[i][0])
    return out
