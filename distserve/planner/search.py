"""Placement search (the DistServe paper's Algorithm 1) and the colocated baselines, over
profiles of one model; Algorithm 2 is in low_affinity.py.

Algorithm 1 (high node-affinity): prefill-only and decode-only instance shapes are scored
separately (goodput by bisection, one target each); the combination (n prefill + m decode
instances) that fits the cluster and maximizes the pair's goodput per device is kept.
Jobs that cannot be part of it stop early (prune.py).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distserve.model.registry import ARCHITECTURES
from distserve.planner.jobs import Batch, score, worker_pool
from distserve.planner.phases import InstanceConfig, Setting
from distserve.planner.prune import Key, PairFloors, ShapeFloors, pair_best
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
        per_instance = p.cores or p.tp
        if per_instance > cluster.devices_per_node:
            continue
        if arch is not None and arch.num_heads % p.tp:
            continue
        layers = arch.num_layers if arch is not None else 1
        for pp in range(1, (max_pp or cluster.num_nodes * cluster.devices_per_node) + 1):
            whole = per_instance if p.cores else per_instance * pp  # CPU: all stages' cores
            if layers % pp or whole > cluster.devices:
                continue
            # a profile measured at pp > 1 (CPU: profile --pp) stands for that pp only; a
            # CPU profile is not extrapolated to stages (their cost is measured, not known)
            if p.pp > 1 and pp != p.pp:
                continue
            if pp > 1 and p.pp == 1 and (arch is None or p.cores):
                continue
            out.append(InstanceConfig(p, pp))
    return out


def best_combination(
    prefill: list[Scored], decode: list[Scored], cluster: Cluster, rate: float | None
) -> Choice | None:
    """n prefill + m decode instances within the cluster: with a target `rate`, the fewest
    devices that sustain it; else the highest goodput per device (ties: fewer devices)."""
    best = best_combinations(prefill, decode, cluster, rate, 1)
    return best[0] if best else None


def best_combinations(
    prefill: list[Scored], decode: list[Scored], cluster: Cluster, rate: float | None, k: int
) -> list[Choice]:
    """The best combinations of a prefill and a decode shape (each with its best n and m,
    `best_combination`'s order; of equal ones the first found), best first: the best one
    of each of the `k` decode shapes whose best combination ranks highest. Apart, a
    decode shape is scored behind an ideal prefill side; jointly (verify.py) it can reach
    half that (OPT-13B, 8 GPUs: decode tp2 22.1 req/s alone, its combinations 11.6-12.8
    jointly), so the candidates differ in their decode shape."""
    found: list[tuple[Key, Scored, Scored, int, int]] = []
    for sp, sd in itertools.product(prefill, decode):
        if sp.goodput <= 0 or sd.goodput <= 0:
            continue
        dp, dd = sp.config.devices, sd.config.devices
        pair = pair_best(sp.goodput, dp, sd.goodput, dd, cluster.devices, rate)
        if pair is not None:
            found.append((pair[0], sp, sd, pair[1], pair[2]))
    found.sort(key=lambda f: f[0], reverse=True)  # stable: the first of equal keys first
    out: list[Choice] = []
    for _, sp, sd, n, m in found:
        if len(out) == k:
            break
        if any(c.decode == sd.config for c in out):
            continue
        g = min(n * sp.goodput, m * sd.goodput)
        out.append(Choice("disagg", sp.config, sd.config, num_prefill=n, num_decode=m, goodput=g))
    return out


def replicate(
    unit: Choice, cluster: Cluster, rate: float | None, most: int | None = None
) -> Choice:
    """Copies of a unit placement: enough for `rate`, else as many as the cluster holds
    (`most`, where the unit's layout allows fewer than its devices suggest)."""
    most = max(1, cluster.devices // unit.devices if most is None else most)
    copies = max(1, math.ceil(rate / unit.goodput)) if rate and unit.goodput > 0 else most
    copies = min(copies, most)
    for name in ("num_prefill", "num_decode", "num_colocated"):
        setattr(unit, name, getattr(unit, name) * copies)
    unit.goodput *= copies
    return unit


def algorithm1_batch(
    setting: Setting,
    prefill_shapes: list[InstanceConfig],
    decode_shapes: list[InstanceConfig],
    cluster: Cluster,
    rate: float | None,
    prune: bool = True,
) -> Batch:
    """Algorithm 1's jobs: each prefill shape on TTFT alone, each decode shape on TPOT
    alone; `prune`: stop those that cannot be part of the answer early (prune.py)."""
    jobs = [(s, "prefill") for s in prefill_shapes] + [(s, "decode") for s in decode_shapes]
    return Batch(setting, jobs, PairFloors(jobs, cluster.devices, rate) if prune else None)


def algorithm1_choice(
    batch: Batch, cluster: Cluster, rate: float | None
) -> tuple[Choice | None, dict[str, Any]]:
    """The best combination of the scored shapes, and their goodputs by role and shape."""
    choices, table = algorithm1_choices(batch, cluster, rate, 1)
    return (choices[0] if choices else None), table


def algorithm1_choices(
    batch: Batch, cluster: Cluster, rate: float | None, k: int
) -> tuple[list[Choice], dict[str, Any]]:
    """The `k` best combinations of the scored shapes by their phases' goodputs, best
    first, and those goodputs by role and shape."""
    scored = [Scored(s, g) for (s, _), g in zip(batch.jobs, batch.goodputs, strict=True)]
    pre = [x for x, (_, role) in zip(scored, batch.jobs, strict=True) if role == "prefill"]
    dec = [x for x, (_, role) in zip(scored, batch.jobs, strict=True) if role == "decode"]
    table: dict[str, Any] = {
        "prefill": {s.config.label: s.goodput for s in pre},
        "decode": {s.config.label: s.goodput for s in dec},
    }
    if batch.at_least:  # stopped at their ceiling (prune.py): lower bounds
        table["at_least"] = sorted(
            f"{batch.jobs[i][1]} {batch.jobs[i][0].label}" for i in batch.at_least
        )
    return best_combinations(pre, dec, cluster, rate, k), table


def algorithm1(
    setting: Setting,
    prefill_shapes: list[InstanceConfig],
    decode_shapes: list[InstanceConfig],
    cluster: Cluster,
    rate: float | None,
    workers: int,
    progress: Callable[[str], None] | None,
    prune: bool = True,
) -> tuple[Choice | None, dict[str, Any]]:
    """Algorithm 1 on its own (`make_plan` runs it beside the baselines)."""
    batch = algorithm1_batch(setting, prefill_shapes, decode_shapes, cluster, rate, prune)
    with worker_pool(workers) as pool:
        score([batch], pool, workers, progress)
    return algorithm1_choice(batch, cluster, rate)


def baseline_batch(
    setting: Setting, shapes: list[InstanceConfig], chunked: bool, prune: bool = True
) -> Batch:
    """A colocated baseline's jobs: each shape serving both phases, both targets."""
    role = "chunked" if chunked else "colocated"
    floors = ShapeFloors([s.devices for s in shapes]) if prune else None
    return Batch(setting, [(s, role) for s in shapes], floors)


def baseline_choice(
    batch: Batch, cluster: Cluster, rate: float | None
) -> tuple[Choice | None, dict[str, float]]:
    """Copies of the scored shape of best goodput per device (ties: the first)."""
    scored = [Scored(s, g) for (s, _), g in zip(batch.jobs, batch.goodputs, strict=True)]
    table = {s.config.label: s.goodput for s in scored}
    best = max((s for s in scored if s.goodput > 0), key=lambda s: s.per_device, default=None)
    if best is None:
        return None, table
    chunked = batch.jobs[0][1] == "chunked"
    unit = Choice(
        "colocated", colocated=best.config, num_colocated=1, chunked=chunked, goodput=best.goodput
    )
    return replicate(unit, cluster, rate), table


def colocated_baseline(
    setting: Setting,
    shapes: list[InstanceConfig],
    cluster: Cluster,
    rate: float | None,
    chunked: bool,
    workers: int,
    progress: Callable[[str], None] | None,
    prune: bool = True,
) -> tuple[Choice | None, dict[str, float]]:
    """One colocated baseline on its own (`make_plan` runs it beside the search)."""
    batch = baseline_batch(setting, shapes, chunked, prune)
    with worker_pool(workers) as pool:
        score([batch], pool, workers, progress)
    return baseline_choice(batch, cluster, rate)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0
