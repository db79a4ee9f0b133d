"""Simulate a placement on a workload and summarize exactly as `bench` does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.metrics.results import RequestResult, write_results
from distserve.metrics.slo import min_slo_scale
from distserve.metrics.summary import summarize
from distserve.sim.latency import latency_model
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload import Workload


@dataclass(frozen=True)
class SimOptions:
    """Knobs of the simulated system beyond its profiles."""

    path: ServingPath = field(
        default=ServingPath(), metadata={"help": "the serving path every instance runs on"}
    )
    num_blocks: int | None = field(
        default=None, metadata={"help": "KV blocks per instance (None: the profile's capacity)"}
    )
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_caching: bool = field(
        default=True, metadata={"help": "instances reuse cached prefixes, as the engine does"}
    )
    kv_store_gb: float = field(
        default=0.0, metadata={"help": "GiB of the KV store (serve --kv-store-gb); 0: none"}
    )
    kv_store_disk_gb: float = field(
        default=0.0,
        metadata={"help": "GiB of the store's disk tier (serve --kv-store-disk-gb); 0: none"},
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

    latency = {role: latency_model(p, opts.path) for role, p in profiles.items()}
    slots = disk_slots = 0
    if opts.kv_store_disk_gb and not opts.kv_store_gb:
        raise ValueError("kv_store_disk_gb needs a KV store (kv_store_gb) too")
    if opts.kv_store_gb > 0:
        per_block = latency["prefill"].kv_bytes_per_token * opts.block_size
        if not per_block:
            raise ValueError(
                f"profile of {prefill.model} gives no KV bytes per token: no store size"
            )
        slots = max(1, int(opts.kv_store_gb * 2**30 // per_block))
        disk_slots = int(opts.kv_store_disk_gb * 2**30 // per_block)
    return SimConfig(
        placement=placement,
        latency=latency,
        num_blocks={role: blocks(p) for role, p in profiles.items()},
        scheduler=opts.scheduler,
        block_size=opts.block_size,
        prefix_caching=opts.prefix_caching,
        kv_store_slots=slots,
        kv_store_disk_slots=disk_slots,
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
        "prefix_cache_hit_tokens": {
            i.name: i.scheduler.num_prompt_tokens_cached for i in sim.instances
        },
        "prefilled_on_decode": sim.prefilled_on_decode,
    }
    if sim.adaptive is not None:  # simulate --adaptive: the flips and what each re-plan saw
        summary["simulator"]["flips"] = sim.flips
        summary["simulator"]["replans"] = sim.adaptive.replans
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
