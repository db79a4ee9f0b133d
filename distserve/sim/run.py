"""Simulate a placement on a workload and summarize exactly as `bench` does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from distserve.bench.metrics import min_slo_scale, summarize
from distserve.bench.results import RequestResult, write_results
from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.model.registry import ARCHITECTURES
from distserve.sim.latency import LatencyModel
from distserve.sim.profile import Profile
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload import Workload


@dataclass(frozen=True)
class SimOptions:
    """Knobs of the simulated system beyond its profiles."""

    step_overhead: float = field(
        default=0.0, metadata={"help": "seconds per step outside the model"}
    )
    transfer_bandwidth: float | None = field(
        default=None, metadata={"help": "KV migration bytes/s (None: the profile's, else 10 GB/s)"}
    )
    transfer_overhead: float = field(default=0.0, metadata={"help": "fixed seconds per migration"})
    compute_scale: float = field(
        default=1.0,
        metadata={"help": "model time when serving over model time when profiled"},
    )
    decode_scale: float | None = field(
        default=None, metadata={"help": "the same for decode steps (None: compute_scale)"}
    )
    contended_scale: float | None = field(
        default=None,
        metadata={"help": "prefill's scale while every other instance decodes (None: same)"},
    )
    contended_decode_scale: float | None = field(
        default=None,
        metadata={"help": "decode's scale while every other instance decodes (None: same)"},
    )
    decode_seq_time: float = field(
        default=0.0,
        metadata={"help": "seconds each decode request of a step adds beyond the first"},
    )
    num_blocks: int | None = field(
        default=None, metadata={"help": "KV blocks per instance (None: the profile's capacity)"}
    )
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def kv_bytes_per_token(profile: Profile) -> int:
    if "kv_bytes_per_token" in profile.fit:
        return int(profile.fit["kv_bytes_per_token"])
    arch = ARCHITECTURES.get(profile.model)
    return arch.kv_bytes_per_token(2) if arch is not None else 0


def latency_model(profile: Profile, opts: SimOptions) -> LatencyModel:
    bw = opts.transfer_bandwidth or float(profile.fit.get("transfer_bandwidth", 1e10))
    return LatencyModel(
        profile,
        opts.step_overhead,
        kv_bytes_per_token(profile),
        bw,
        opts.transfer_overhead,
        opts.compute_scale,
        opts.decode_scale,
        opts.contended_scale,
        opts.contended_decode_scale,
        opts.decode_seq_time,
    )


def sim_config(
    placement: PlacementConfig, prefill: Profile, decode: Profile | None, opts: SimOptions
) -> SimConfig:
    """Prefill (and colocated) instances use `prefill`'s profile, decode instances
    `decode`'s (default: the same)."""
    decode = decode or prefill
    profiles = {"prefill": prefill, "colocated": prefill, "decode": decode}

    def blocks(p: Profile) -> int:
        if opts.num_blocks is not None:
            return opts.num_blocks
        if p.kv_capacity_tokens is None:
            raise ValueError(f"profile of {p.model} has no KV capacity: pass num_blocks")
        return p.kv_capacity_tokens // opts.block_size

    return SimConfig(
        placement=placement,
        latency={role: latency_model(p, opts) for role, p in profiles.items()},
        num_blocks={role: blocks(p) for role, p in profiles.items()},
        scheduler=opts.scheduler,
        block_size=opts.block_size,
    )


def simulate(
    config: SimConfig,
    workload: Workload,
    ttft_slo: float,
    tpot_slo: float,
    output: str | None = None,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Run and summarize; the summary and file have the same shape as a real run's."""
    t0 = time.perf_counter()
    sim = Simulator(config)
    results = sim.run(workload)
    wall = time.perf_counter() - t0
    end = max((r.arrival + r.e2e for r in results if r.e2e is not None), default=0.0)
    summary = summarize(results, ttft_slo, tpot_slo, end)
    summary["min_slo_scale"] = {
        k: min_slo_scale(results, ttft_slo, tpot_slo, 0.9, k) for k in ("both", "ttft", "tpot")
    }
    summary["simulator"] = {
        "wall_seconds": wall,
        "steps": {i.name: i.steps for i in sim.instances},
        "busy_seconds": {i.name: i.busy_seconds for i in sim.instances},
    }
    if output:
        write_results(
            output,
            {
                "simulated": config.to_dict(),
                "workload": workload.meta,
                "slo": {"ttft": ttft_slo, "tpot": tpot_slo},
            },
            summary,
            results,
        )
    return summary, results
