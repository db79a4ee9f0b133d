"""Goodput of one instance configuration, found by bisection on rate with the simulator:
a prefill-only instance (TTFT target, the decode side ideal), a decode-only instance
(TPOT target, the prefill side ideal), a colocated instance, or a whole placement.

Pipeline parallelism is modelled as pp virtual instances of the same role, each taking the
full pass time plus a per-stage overhead and holding 1/pp of the KV cache: throughput pp
times a single pass, latency one pass (as vLLM's virtual engines behave)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.metrics.results import RequestResult
from distserve.metrics.slo import attainment, attains
from distserve.planner.bisection import bisect_rate
from distserve.sim.latency import LatencyModel, latency_model
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload import Workload, WorkloadRequest

IDEAL = Profile(
    "ideal", "ideal", kv_capacity_tokens=4_000_000, source="no cost: the other phase, idealized"
)
STAGE_OVERHEAD = 0.001
"""Seconds each pipeline stage adds to a pass (the DistServe simulator adds 1 ms per stage)."""


@dataclass(frozen=True)
class InstanceConfig:
    """One instance shape: its profile (at some tp) and its pipeline degree."""

    profile: Profile
    pp: int = 1

    @property
    def devices(self) -> int:
        """GPUs (tp x pp), or CPU cores: a CPU profile's cores are the whole instance's
        (measured at its shape: its tensor ranks and stages share them)."""
        p = self.profile
        return p.cores if p.cores else p.tp * self.pp

    @property
    def label(self) -> str:
        p = self.profile
        unit = f"{p.cores} core(s)" if p.cores else f"tp{p.tp}"
        return f"{unit} pp{self.pp}"

    def kv_blocks(
        self, block_size: int, capacity: dict[tuple[str, int, int], int] | None
    ) -> int | None:
        """KV blocks of one virtual instance, or None if the shape does not fit."""
        p = self.profile
        if self.pp == p.pp:  # measured at this shape (pp 1, or profile --pp)
            cap = p.kv_capacity_tokens
        else:
            cap = (capacity or {}).get((p.model, p.tp, self.pp))
        if cap is None:
            return None
        return cap // self.pp // block_size


def staged(profile: Profile, pp: int) -> Profile:
    """The profile of one full pass through pp stages (per-stage overhead added); a
    profile measured at pp (`distserve profile --pp`) has its stages' costs in it."""
    if pp == 1 or profile.pp == pp:
        return profile

    def add(t: tuple[float, float, float]) -> tuple[float, float, float]:
        return (t[0] + pp * STAGE_OVERHEAD, t[1], t[2])

    return dataclasses.replace(
        profile,
        prefill=add(profile.prefill),
        decode_small=add(profile.decode_small),
        decode_large=add(profile.decode_large),
    )


@dataclass(frozen=True)
class Setting:
    """What every simulation of a search shares."""

    workload: Workload
    ttft_slo: float
    tpot_slo: float
    target: float = 0.9
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    block_size: int = 16
    capacity: dict[tuple[str, int, int], int] | None = None
    path: ServingPath = ServingPath(transfer_bandwidth=1e10)
    """The serving path every simulated instance runs on (KV migrates at 10 GB/s unless
    it says otherwise)."""
    min_requests: int = 300
    """Requests per simulation at least; more (up to the workload's size) where the
    placement holds many at once."""
    prefix_caching: bool = True
    """Whether simulated instances reuse cached prefixes, as `serve` does by default
    (False: every prompt computed whole, as the paper's systems did)."""


def at_rate(workload: Workload, rate: float) -> Workload:
    """The same requests with arrivals stretched to a new mean rate (same gap pattern)."""
    base = workload.meta.get("spec", {}).get("rate", 1.0)
    factor = float(base) / rate if base != "inf" else 0.0
    reqs = tuple(
        WorkloadRequest(r.index, r.arrival * factor, r.prompt_token_ids, r.output_len)
        for r in workload.requests
    )
    return Workload(reqs, workload.meta)


def placement_goodput(
    setting: Setting,
    prefill: InstanceConfig | None,
    decode: InstanceConfig | None,
    colocated: InstanceConfig | None = None,
    num_prefill: int = 1,
    num_decode: int = 1,
    num_colocated: int = 1,
    chunked: bool = False,
    only: str = "both",
    guess: float | None = None,
    floor: float = 0.0,
    ceiling: float = math.inf,
    near: float | None = None,
) -> float:
    """Goodput (req/s) of a placement; `prefill`/`decode` None means that phase is ideal.
    `only`: which target counts ('both', 'ttft' or 'tpot'). `floor`: 0 as soon as the
    goodput is known to be below it; `ceiling`: the first rate at or above it that attains
    (see `bisect_rate`). The search starts at 0.8 `guess`, else at one prefill-bound rate
    (`_guess`) doubled or halved to the last at or under `near` (a rate the goodput is
    likely under): where attainment falls with rate, the same bracket as from the
    prefill-bound rate itself, so the same answer, without the probes that reach it."""
    attain = placement_attainment(
        setting, prefill, decode, colocated, num_prefill, num_decode, num_colocated, chunked, only
    )
    if attain is None:
        return 0.0
    if guess:
        start = 0.8 * guess
    else:
        start = _guess(setting, prefill or colocated, decode or colocated)
        if near:  # the same grid, nearer: start * 2^k at or under `near`
            start *= 2.0 ** math.floor(math.log2(near / start))
    return bisect_rate(attain, setting.target, start, floor=floor, ceiling=ceiling)


def simulation(
    setting: Setting,
    prefill: InstanceConfig | None,
    decode: InstanceConfig | None,
    colocated: InstanceConfig | None = None,
    num_prefill: int = 1,
    num_decode: int = 1,
    num_colocated: int = 1,
    chunked: bool = False,
) -> tuple[SimConfig, Workload] | None:
    """The simulator's configuration of a placement and the requests it runs, arrivals at
    the workload's own rate (None if a shape does not fit); `prefill`/`decode` None means
    that phase is ideal (no cost)."""
    s = setting
    roles: dict[str, tuple[LatencyModel, int]] = {}
    if colocated is not None:
        blocks = colocated.kv_blocks(s.block_size, s.capacity)
        if blocks is None:
            return None
        roles["colocated"] = (
            latency_model(staged(colocated.profile, colocated.pp), s.path),
            blocks,
        )
        placement = PlacementConfig(
            mode="colocated", num_instances=num_colocated * colocated.pp, chunked_prefill=chunked
        )
    else:
        for role, inst in (("prefill", prefill), ("decode", decode)):
            if inst is None:
                roles[role] = (LatencyModel(IDEAL), 0)  # blocks: sized to the run below
                continue
            blocks = inst.kv_blocks(s.block_size, s.capacity)
            if blocks is None:
                return None
            roles[role] = (latency_model(staged(inst.profile, inst.pp), s.path), blocks)
        placement = PlacementConfig(
            mode="disagg",
            num_prefill=num_prefill * (prefill.pp if prefill else 1),
            num_decode=num_decode * (decode.pp if decode else 1),
        )
    sched = dataclasses.replace(s.scheduler, chunked_prefill=chunked)

    # A finite workload hides overload when it is smaller than what the placement can
    # hold at once (one burst fits): use several times the placement's concurrency.
    pool = s.workload.requests
    tokens = sum(r.prompt_len + r.output_len for r in pool) / len(pool)
    concurrent = sum(
        placement.roles.count(role) * min(sched.max_num_seqs, blocks * s.block_size / tokens)
        for role, (lat, blocks) in roles.items()
        if lat.profile is not IDEAL
    )
    size = min(len(pool), max(s.min_requests, int(3 * concurrent)))
    workload = Workload(pool[:size], s.workload.meta)
    if colocated is None and decode is None:
        # Decode is ideal, so only TTFT can miss, and it ends at the first token: one-token
        # outputs give the same TTFTs without simulating any decode step.
        workload = Workload(
            tuple(
                WorkloadRequest(r.index, r.arrival, r.prompt_token_ids, 1)
                for r in workload.requests
            ),
            workload.meta,
        )
    num_blocks = {r: n or _ideal_blocks(workload, s.block_size) for r, (_, n) in roles.items()}
    latency = {role: lat for role, (lat, _) in roles.items()}
    config = SimConfig(
        placement, latency, num_blocks, sched, s.block_size, prefix_caching=s.prefix_caching
    )
    return config, workload


def _ideal_blocks(workload: Workload, block_size: int) -> int:
    """KV blocks of an ideal instance: IDEAL's capacity, or fewer where twice the whole
    run's KV fits (a block manager's free list costs 5 ms at IDEAL's 250,000 blocks). With
    every request's blocks at most half of them, the ideal side behaves as with IDEAL's:
    its back-pressure (over half held) never fires and the watermark (1%) never bites."""
    cap = IDEAL.kv_capacity_tokens // block_size  # type: ignore[operator]
    need = sum(-(-(r.prompt_len + r.output_len + 1) // block_size) for r in workload.requests)
    return min(cap, 2 * need + 16)


def placement_attainment(
    setting: Setting,
    prefill: InstanceConfig | None,
    decode: InstanceConfig | None,
    colocated: InstanceConfig | None = None,
    num_prefill: int = 1,
    num_decode: int = 1,
    num_colocated: int = 1,
    chunked: bool = False,
    only: str = "both",
    exact: bool = False,
) -> Callable[[float], float] | None:
    """The placement's simulated attainment as a function of rate (None if a shape does
    not fit). Unless `exact`, a simulation stops as soon as its verdict is certain: once
    the target is out of reach, returning a value below it, and once enough requests
    have attained it, returning a value at or above it (the unfinished count as failed),
    which is all a bisection needs. A request counts as missed from the moment it is
    certain to miss (its first token overdue, or its TPOT past saving), not only once it
    finishes: an overloaded run ends as soon as its queue has made enough of them late."""
    setup = simulation(
        setting, prefill, decode, colocated, num_prefill, num_decode, num_colocated, chunked
    )
    if setup is None:
        return None
    config, workload = setup
    ttft = setting.ttft_slo if only in ("both", "ttft") else math.inf
    tpot = setting.tpot_slo if only in ("both", "tpot") else math.inf
    # floored with a margin: (1 - 0.9) * 240 is 23.999..., and 24 misses of 240 attain 90%
    misses_allowed = math.inf if exact else math.floor((1 - setting.target) * len(workload) + 1e-6)
    hits_enough = math.inf if exact else _enough(setting.target, len(workload))

    def attain(rate: float) -> float:
        misses = hits = 0
        lost_ones: set[int] = set()

        def give_up(r: RequestResult) -> bool:  # the verdict is certain: stop early
            nonlocal misses, hits
            if r.index in lost_ones:
                return False  # counted when it was lost
            if all(attains(r, ttft, tpot)):
                hits += 1
            else:
                misses += 1
            return misses > misses_allowed or hits >= hits_enough

        def lost(r: RequestResult) -> bool:  # unfinished, but certain to miss
            nonlocal misses
            lost_ones.add(r.index)
            misses += 1
            return misses > misses_allowed

        sim = Simulator(config)
        if exact:
            results = sim.run(at_rate(workload, rate))
        else:
            results = sim.run(at_rate(workload, rate), give_up, lost, (ttft, tpot))
        return attainment(results, ttft, tpot)["both"]

    return attain


def _enough(target: float, n: int) -> int:
    """The fewest attaining requests of n whose share, computed as `attainment` computes
    it (a float division), is >= target: a run that has them attains, however the rest
    end."""
    hits = max(0, math.ceil(target * n) - 1)
    while hits < n and hits / n < target:
        hits += 1
    return hits if hits / n >= target else n + 1  # n + 1: never (target above 100%)


def _guess(
    setting: Setting, prefill: InstanceConfig | None, decode: InstanceConfig | None
) -> float:
    """A starting rate near capacity: the prefill-bound rate of one median request."""
    lens = sorted(r.prompt_len for r in setting.workload.requests)
    med = lens[len(lens) // 2]
    p = prefill or decode
    if p is None:
        return 1.0
    t = staged(p.profile, p.pp).prefill_time([med])
    return max(0.01, p.pp / t) if t > 0 else 1.0
