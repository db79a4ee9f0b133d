"""Cheap analytic estimates of an instance's goodput, from the profile formulas and mean
lengths: they order the search's jobs (likely winners first) and seed each bisection's
first rate. They are not bounds: a decode shape's simulated goodput was up to 2.1x its
estimate (a finite run absorbs overload), so they decide nothing (prune.py)."""

from __future__ import annotations

import math

from distserve.planner.phases import InstanceConfig, Setting, staged


def _means(setting: Setting) -> tuple[float, float]:
    reqs = setting.workload.requests
    return sum(r.prompt_len for r in reqs) / len(reqs), sum(r.output_len for r in reqs) / len(reqs)


def prefill_estimate(inst: InstanceConfig, setting: Setting) -> float:
    """Requests/s a prefill instance could finish with full batches, if a lone request
    meets the TTFT target at all (else 0)."""
    prompt, _ = _means(setting)
    p = staged(inst.profile, inst.pp)
    n = max(1, round(prompt))
    if p.prefill_time([n]) > setting.ttft_slo:
        return 0.0
    k = max(1, setting.scheduler.max_num_batched_tokens // n)
    return inst.pp * k / p.prefill_time([n] * k)


def decode_estimate(inst: InstanceConfig, setting: Setting) -> float:
    """Requests/s a decode instance could finish with the largest batch that its memory,
    its seat limit and the TPOT target allow (0 if even one request misses TPOT)."""
    prompt, output = _means(setting)
    p = staged(inst.profile, inst.pp)
    blocks = inst.kv_blocks(setting.block_size, setting.capacity)
    if blocks is None:
        return 0.0
    context = round(prompt + output / 2)
    # a request holds its prompt and, on average, half of its output
    seats = min(
        setting.scheduler.max_num_seqs,
        max(1, int(blocks * setting.block_size / (prompt + output / 2))),
    )

    def step(batch: int) -> float:
        return p.decode_time([context] * batch)

    if step(1) > setting.tpot_slo:
        return 0.0
    lo, hi = 1, seats
    while lo < hi:  # the largest batch whose step meets TPOT
        mid = (lo + hi + 1) // 2
        if step(mid) <= setting.tpot_slo:
            lo = mid
        else:
            hi = mid - 1
    return inst.pp * lo / (max(1.0, output - 1) * step(lo))


def colocated_estimate(inst: InstanceConfig, setting: Setting) -> float:
    """An instance doing both phases shares its time between them."""
    pb, db = prefill_estimate(inst, setting), decode_estimate(inst, setting)
    if pb <= 0 or db <= 0:
        return 0.0
    return 1.0 / (1.0 / pb + 1.0 / db)


def estimate(inst: InstanceConfig, role: str, setting: Setting) -> float:
    if role == "prefill":
        return prefill_estimate(inst, setting)
    if role == "decode":
        return decode_estimate(inst, setting)
    return colocated_estimate(inst, setting)


def is_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0
