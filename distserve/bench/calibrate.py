"""Calibrate the simulator against a running server, from lone requests (no queueing or
batching mixed in): how much slower the model runs when serving than when profiled (the
workers share the machine with the API server, the controller and the clients), and the
per-step time the serving path adds outside the model (the round trip to the worker,
sampling, streaming)."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from distserve.bench.client import run_workload
from distserve.workload.spec import Workload


@dataclasses.dataclass(frozen=True)
class Calibration:
    compute_scale: float
    """Server-side prefill time of the lone request over the profile's."""
    step_overhead: float
    """Seconds per decode step beyond the profile's step (scaled), never negative."""


async def calibrate(
    url: str, model: str, profile: Any, workload: Workload, reps: int = 3, output_len: int = 32
) -> Calibration:
    """Send the workload's median-length request alone `reps` times (after one warm-up);
    compare its server-side prefill time with the profile's prefill, and its TPOT with
    the profile's decode step at its context (medians over the reps)."""
    req = sorted(workload.requests, key=lambda r: r.prompt_len)[len(workload) // 2]
    alone = Workload((dataclasses.replace(req, index=0, arrival=0.0, output_len=output_len),), {})
    model_prefill = profile.prefill_time([req.prompt_len])
    model_step = profile.decode_time([req.prompt_len + output_len // 2])
    scales, tpots = [], []
    for i in range(reps + 1):
        (res,), _ = await run_workload(url, alone, model, progress=False)
        if not res.ok:
            raise RuntimeError(f"calibration request failed: {res.error}")
        if i == 0:
            continue  # warm-up: first-touch of the cache blocks, allocator growth
        s = res.server
        if "prefill_start" in s and "prefill_end" in s and model_prefill > 0:
            scales.append((s["prefill_end"] - s["prefill_start"]) / model_prefill)
        tpots.append(res.tpot or 0.0)
    scale = statistics.median(scales) if scales else 1.0
    overhead = max(0.0, statistics.median(tpots) - scale * model_step)
    return Calibration(scale, overhead)
