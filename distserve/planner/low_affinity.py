"""Algorithm 2 of the DistServe paper (low node-affinity): where KV moves fast only inside
a node, the prefill and the decode segment of the same layers share a node.

A unit is one prefill and one decode instance of the same pipeline degree pp, each stage
on its own node; stage j of both sits on one node, so each migration stays inside a node:

    node 1: [prefill stage 1 | decode stage 1]   (tp_p + tp_d devices)
    node 2: [prefill stage 2 | decode stage 2]
    ...      up to pp nodes

Units are simulated jointly (1 prefill + 1 decode), the best per device is kept and copied
as often as the nodes hold its segments.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from distserve.planner.jobs import process_pool
from distserve.planner.phases import InstanceConfig, Setting, placement_goodput
from distserve.planner.search import Choice, Cluster, candidates, replicate
from distserve.sim.profile import Profile

Unit = tuple[InstanceConfig, InstanceConfig]


def segment_devices(unit: Unit) -> int:
    """Devices one stage of a unit takes on its node: its prefill and decode segments."""
    pre, dec = unit
    return (pre.devices + dec.devices) // pre.pp


def units(
    prefill_profiles: Sequence[Profile],
    decode_profiles: Sequence[Profile],
    cluster: Cluster,
    max_pp: int | None = None,
) -> list[Unit]:
    """Every (prefill, decode) pair of the same pipeline degree (at most one stage per
    node) whose two segments of a stage fit in one node."""
    most = min(cluster.num_nodes, max_pp or cluster.num_nodes)
    pre = candidates(prefill_profiles, cluster, most)
    dec = candidates(decode_profiles, cluster, most)
    return [
        (p, d)
        for p, d in itertools.product(pre, dec)
        if p.pp == d.pp and segment_devices((p, d)) <= cluster.devices_per_node
    ]


def copies_that_fit(unit: Unit, cluster: Cluster) -> int:
    """How many copies of a unit the cluster holds: each node takes a whole number of
    segments, and a copy's pp stages go to pp different nodes (round-robin over the nodes
    places any count up to this)."""
    per_node = cluster.devices_per_node // segment_devices(unit)
    return cluster.num_nodes * per_node // unit[0].pp


def _unit_goodput(job: tuple[Setting, InstanceConfig, InstanceConfig]) -> float:
    setting, p, d = job
    return placement_goodput(setting, p, d)


def algorithm2(
    setting: Setting,
    prefill_profiles: Sequence[Profile],
    decode_profiles: Sequence[Profile],
    cluster: Cluster,
    rate: float | None,
    workers: int,
    progress: Callable[[str], None] | None,
    max_pp: int | None = None,
    pool: Executor | None = None,
) -> tuple[Choice | None, dict[str, Any]]:
    """The unit of best goodput per device (ties: the first in `units` order), copied
    for `rate` or to fill the cluster; decode segments run on `decode_profiles`. Units
    are simulated on `pool` if given, else on `workers` processes of their own."""
    jobs = units(prefill_profiles, decode_profiles, cluster, max_pp)
    args = [(setting, p, d) for p, d in jobs]
    if pool is None and workers > 1 and len(args) > 1:
        with process_pool(workers) as own:
            goodputs = list(own.map(_unit_goodput, args))
    elif pool is not None:
        goodputs = list(pool.map(_unit_goodput, args))
    else:
        goodputs = [_unit_goodput(a) for a in args]
    best: Choice | None = None
    table = {}
    for (pre, dec), g in zip(jobs, goodputs, strict=True):
        table[f"P {pre.label} + D {dec.label}"] = g
        if progress:
            progress(f"unit P {pre.label} + D {dec.label}: {g:.3f} req/s")
        c = Choice("disagg", pre, dec, num_prefill=1, num_decode=1, goodput=g)
        if g > 0 and (best is None or c.per_device > best.per_device):
            best = c
    if best is None:
        return None, table
    assert best.prefill is not None and best.decode is not None
    most = copies_that_fit((best.prefill, best.decode), cluster)
    return replicate(best, cluster, rate, most), table
