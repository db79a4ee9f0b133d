"""Placement search (the DistServe paper's Algorithms 1 and 2) and the colocated
baselines, over profiles of one model.

Algorithm 1 (high node-affinity): the best prefill-only and the best decode-only
instance shapes are searched separately, each by its goodput per device; the combination
(n prefill + m decode instances) that fits the cluster and maximizes the pair's goodput per
device is kept. Algorithm 2 (low node-affinity): a prefill and a decode segment of the same
layers share a node; pairs are simulated jointly for each inter-node pipeline degree.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from distserve.model.registry import ARCHITECTURES
from distserve.planner.bounds import bound
from distserve.planner.phases import InstanceConfig, Setting, placement_goodput
from distserve.sim.profile import Profile


@dataclass(frozen=True)
class Cluster:
    num_nodes: int
    devices_per_node: int
    kind: str = "gpu"
    """'gpu', or 'cpu-core' when a device is one CPU core."""

    @property
    def devices(self) -> int:
        return self.num_nodes * self.devices_per_node


@dataclass
class Scored:
    config: InstanceConfig
    goodput: float

    @property
    def per_device(self) -> float:
        return self.goodput / self.config.devices


@dataclass
class Choice:
    """A placement and its predicted goodput."""

    mode: str
    prefill: InstanceConfig | None = None
    decode: InstanceConfig | None = None
    colocated: InstanceConfig | None = None
    num_prefill: int = 0
    num_decode: int = 0
    num_colocated: int = 0
    chunked: bool = False
    goodput: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def devices(self) -> int:
        if self.colocated is not None:
            return self.num_colocated * self.colocated.devices
        assert self.prefill is not None and self.decode is not None
        return self.num_prefill * self.prefill.devices + self.num_decode * self.decode.devices

    @property
    def per_device(self) -> float:
        return self.goodput / self.devices if self.devices else 0.0


def candidates(
    profiles: Sequence[Profile], cluster: Cluster, max_pp: int | None = None
) -> list[InstanceConfig]:
    """Instance shapes: every profile (a tp degree, or a core count) times every pipeline
    degree that divides the layer count and fits the cluster (a tp group stays in a node)."""
    out = []
    for p in profiles:
        arch = ARCHITECTURES.get(p.model)
        per_instance = p.tp * (p.cores or 1)
        if per_instance > cluster.devices_per_node:
            continue
        if arch is not None and arch.num_heads % p.tp:
            continue
        layers = arch.num_layers if arch is not None else 1
        for pp in range(1, (max_pp or cluster.num_nodes * cluster.devices_per_node) + 1):
            if layers % pp or per_instance * pp > cluster.devices:
                continue
            # CPU-core profiles: the runtime has no pipeline parallelism to deploy (yet)
            if pp > 1 and (arch is None or p.cores):
                continue
            out.append(InstanceConfig(p, pp))
    return out


def _score(job: tuple[Setting, InstanceConfig, str, float]) -> float:
    setting, inst, role, guess = job
    if role == "prefill":
        return placement_goodput(setting, inst, None, only="ttft", guess=guess)
    if role == "decode":
        return placement_goodput(setting, None, inst, only="tpot", guess=guess)
    return placement_goodput(
        setting, None, None, colocated=inst, chunked=role == "chunked", guess=guess
    )


def score_all(
    setting: Setting,
    jobs: list[tuple[InstanceConfig, str]],
    workers: int,
    progress: Callable[[str], None] | None,
    prune: bool = True,
) -> list[float]:
    """Goodput of each (shape, role) job, simulated in parallel processes. Jobs go in order
    of their analytic bound per device; with `prune`, a job whose bound cannot beat the
    best goodput per device already found for its role is skipped (scored 0)."""
    bounds = [bound(inst, role, setting) for inst, role in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -bounds[i] / jobs[i][0].devices)
    results = [0.0] * len(jobs)
    best: dict[str, float] = {}
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        for start in range(0, len(order), max(1, workers)):
            wave = []
            for i in order[start : start + max(1, workers)]:
                inst, role = jobs[i]
                # bounds use mean lengths, not exact maxima: prune with a margin
                if bounds[i] <= 0 or (
                    prune and 1.5 * bounds[i] / inst.devices < best.get(role, 0.0)
                ):
                    if progress:
                        progress(f"{role} {inst.label}: pruned (bound {bounds[i]:.3f} req/s)")
                    continue
                wave.append(i)
            args = [(setting, jobs[i][0], jobs[i][1], bounds[i]) for i in wave]
            got = list(pool.map(_score, args)) if pool else [_score(a) for a in args]
            for i, g in zip(wave, got, strict=True):
                inst, role = jobs[i]
                results[i] = g
                best[role] = max(best.get(role, 0.0), g / inst.devices)
                if progress:
                    progress(f"{role} {inst.label}: {g:.3f} req/s (bound {bounds[i]:.3f})")
    finally:
        if pool:
            pool.shutdown()
    return results


def best_combination(
    prefill: list[Scored], decode: list[Scored], cluster: Cluster, rate: float | None
) -> Choice | None:
    """n prefill + m decode instances within the cluster: with a target `rate`, the fewest
    devices that sustain it; else the highest goodput per device (ties: fewer devices)."""
    best: Choice | None = None
    for sp, sd in itertools.product(prefill, decode):
        if sp.goodput <= 0 or sd.goodput <= 0:
            continue
        dp, dd = sp.config.devices, sd.config.devices
        for n in range(1, cluster.devices // dp + 1):
            for m in range(1, (cluster.devices - n * dp) // dd + 1):
                g = min(n * sp.goodput, m * sd.goodput)
                c = Choice("disagg", sp.config, sd.config, num_prefill=n, num_decode=m, goodput=g)
                if rate is not None and g < rate:
                    continue
                if best is None or _key(c, rate) > _key(best, rate):
                    best = c
    return best


def _key(c: Choice, rate: float | None) -> tuple[float, float]:
    return (-c.devices, c.per_device) if rate is not None else (c.per_device, -c.devices)


def replicate(unit: Choice, cluster: Cluster, rate: float | None) -> Choice:
    """Copies of a unit placement: enough for `rate`, else as many as the cluster holds."""
    copies = (
        max(1, math.ceil(rate / unit.goodput))
        if rate and unit.goodput > 0
        else max(1, cluster.devices // unit.devices)
    )
    copies = min(copies, max(1, cluster.devices // unit.devices))
    for name in ("num_prefill", "num_decode", "num_colocated"):
        setattr(unit, name, getattr(unit, name) * copies)
    unit.goodput *= copies
    return unit


def algorithm1(
    setting: Setting,
    prefill_shapes: list[InstanceConfig],
    decode_shapes: list[InstanceConfig],
    cluster: Cluster,
    rate: float | None,
    workers: int,
    progress: Callable[[str], None] | None,
) -> tuple[Choice | None, dict[str, Any]]:
    jobs = [(s, "prefill") for s in prefill_shapes] + [(s, "decode") for s in decode_shapes]
    goodputs = score_all(setting, jobs, workers, progress)
    k = len(prefill_shapes)
    pre = [Scored(s, g) for (s, _), g in zip(jobs[:k], goodputs[:k], strict=True)]
    dec = [Scored(s, g) for (s, _), g in zip(jobs[k:], goodputs[k:], strict=True)]
    table = {
        "prefill": {s.config.label: s.goodput for s in pre},
        "decode": {s.config.label: s.goodput for s in dec},
    }
    return best_combination(pre, dec, cluster, rate), table


def algorithm2(
    setting: Setting,
    profiles: Sequence[Profile],
    cluster: Cluster,
    rate: float | None,
    workers: int,
    progress: Callable[[str], None] | None,
) -> tuple[Choice | None, dict[str, Any]]:
    """For each inter-node pipeline degree, prefill and decode segments whose devices fit in
    one node, simulated together as a 1P1D pair."""
    jobs: list[tuple[InstanceConfig, InstanceConfig]] = []
    for pp in range(1, cluster.num_nodes + 1):
        for p, d in itertools.product(profiles, profiles):
            if p.tp * (p.cores or 1) + d.tp * (d.cores or 1) > cluster.devices_per_node:
                continue
            arch = ARCHITECTURES.get(p.model)
            if pp > 1 and (arch is None or arch.num_layers % pp):
                continue
            jobs.append((InstanceConfig(p, pp), InstanceConfig(d, pp)))
    args = [(setting, p, d) for p, d in jobs]
    if workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(workers) as pool:
            goodputs = list(pool.map(_pair_goodput, args))
    else:
        goodputs = [_pair_goodput(a) for a in args]
    best: Choice | None = None
    table = {}
    for (pre, dec), g in zip(jobs, goodputs, strict=True):
        table[f"P {pre.label} + D {dec.label}"] = g
        if progress:
            progress(f"pair P {pre.label} + D {dec.label}: {g:.3f} req/s")
        c = Choice("disagg", pre, dec, num_prefill=1, num_decode=1, goodput=g)
        if g > 0 and (best is None or c.per_device > best.per_device):
            best = c
    return (replicate(best, cluster, rate) if best else None), table


def _pair_goodput(job: tuple[Setting, InstanceConfig, InstanceConfig]) -> float:
    setting, p, d = job
    return placement_goodput(setting, p, d)


def colocated_baseline(
    setting: Setting,
    shapes: list[InstanceConfig],
    cluster: Cluster,
    rate: float | None,
    chunked: bool,
    workers: int,
    progress: Callable[[str], None] | None,
) -> tuple[Choice | None, dict[str, float]]:
    role = "chunked" if chunked else "colocated"
    goodputs = score_all(setting, [(s, role) for s in shapes], workers, progress)
    scored = [Scored(s, g) for s, g in zip(shapes, goodputs, strict=True)]
    table = {s.config.label: s.goodput for s in scored}
    best = max((s for s in scored if s.goodput > 0), key=lambda s: s.per_device, default=None)
    if best is None:
        return None, table
    unit = Choice(
        "colocated", colocated=best.config, num_colocated=1, chunked=chunked, goodput=best.goodput
    )
    return replicate(unit, cluster, rate), table


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0
