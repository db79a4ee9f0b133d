"""Verification: the chosen placement's goodput, simulated jointly (both targets at once)
rather than assembled from its phases' separate goodputs."""

from __future__ import annotations

import math

from distserve.planner.phases import Setting, placement_goodput
from distserve.planner.search import Choice

JOINT_UP_TO = 4
"""Placements of at most this many instances are simulated whole."""


def verify(setting: Setting, c: Choice) -> float:
    """Goodput of the placement, simulated jointly (both targets). A small placement (up
    to JOINT_UP_TO instances) is simulated whole: two colocated CPU instances behind one
    router did 1.4x better than twice one instance at half the rate (one queue pools
    them), and only a whole simulation sees their contention. A larger placement of k
    equal copies (k = the gcd of its instance counts) is simulated as one copy and scaled
    by k, a lower bound that simulates k times faster."""
    if c.colocated is not None:
        k = c.num_colocated if c.num_colocated > JOINT_UP_TO else 1
        return k * placement_goodput(
            setting,
            None,
            None,
            colocated=c.colocated,
            num_colocated=c.num_colocated // k,
            chunked=c.chunked,
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
    )
