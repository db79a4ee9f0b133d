"""Calibrate the simulator against a running server: the per-step time the serving path
adds outside the model (controller, the round trip to the worker, sampling), measured from a
lone request so that no queueing or batching is mixed in."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from distserve.bench.client import run_workload
from distserve.workload.spec import Workload


async def step_overhead(
    url: str, model: str, profile: Any, workload: Workload, reps: int = 3, output_len: int = 32
) -> float:
    """Seconds per decode step the real path adds to the profile's batch-1 step: the TPOT of
    the workload's median-length request, sent alone, minus the profile's step at its
    context (median of `reps`; never negative)."""
    req = sorted(workload.requests, key=lambda r: r.prompt_len)[len(workload) // 2]
    alone = Workload((dataclasses.replace(req, index=0, arrival=0.0, output_len=output_len),), {})
    model_step = profile.decode_time([req.prompt_len + output_len // 2])
    overheads = []
    for _ in range(reps):
        (res,), _ = await run_workload(url, alone, model, progress=False)
        if not res.ok:
            raise RuntimeError(f"calibration request failed: {res.error}")
        overheads.append((res.tpot or 0.0) - model_step)
    return max(0.0, statistics.median(overheads))
