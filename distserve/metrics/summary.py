"""Latency percentiles, the per-phase breakdown of server timings, and a run's summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from distserve.metrics.results import RequestResult
from distserve.metrics.slo import attainment

PHASES = {
    "prefill_queue": ("arrived", "prefill_start"),
    "prefill": ("prefill_start", "prefill_end"),
    "migration_queue": ("prefill_end", "migration_start"),
    "migration": ("migration_start", "migration_end"),
    "decode_queue": ("migration_end", "decode_start"),
    "decode": ("decode_start", "decode_end"),
}
"""Phase name -> (start milestone, end milestone) in the server's per-request timings."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between order statistics; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(
    results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float, duration: float
) -> dict[str, Any]:
    """Counts, attainment, throughput, TTFT/TPOT/E2E percentiles and, where the server
    reported its milestones, each phase's median: the summary of a results file."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    per_token = [r.e2e / r.num_tokens for r in ok if r.e2e is not None and r.num_tokens]
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "attainment": attainment(results, ttft_slo, tpot_slo),
        "slo": {"ttft": ttft_slo, "tpot": tpot_slo},
        "duration_s": duration,
        "throughput_rps": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": sum(r.num_tokens for r in ok) / duration if duration > 0 else None,
    }
    # TPOT is the paper's (the mean gap between tokens after the first); load testers such
    # as guidellm report e2e / tokens, the first token's wait included: both, named
    summary["tpot_definitions"] = {
        "tpot": "mean gap between output tokens after the first (DistServe's; the SLO's)",
        "time_per_output_token": "e2e / output tokens, the first token's wait included "
        "(guidellm's)",
    }
    per = (("ttft", ttft), ("tpot", tpot), ("time_per_output_token", per_token), ("e2e", e2e))
    for name, vals in per:
        summary[name] = {f"p{q}": percentile(vals, q) for q in (50, 90, 99)} | {
            "mean": sum(vals) / len(vals) if vals else None
        }
    breakdown = phase_breakdown(ok)
    if breakdown:
        summary["phases_median"] = {k: percentile(v, 50) for k, v in breakdown.items()}
    if any(r.cached_tokens is not None for r in ok):
        summary["prefix_cache"] = prefix_cache_share(ok)
    if any(r.session is not None for r in ok):
        summary["turns"] = {
            "first": turn_group([r for r in ok if r.turn == 0]),
            "later": turn_group([r for r in ok if r.turn > 0]),
        }
    return summary


def prefix_cache_share(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Prompt tokens the server's prefix cache supplied, over the requests that said."""
    told = [r for r in results if r.cached_tokens is not None]
    cached, prompt = sum(r.cached_tokens or 0 for r in told), sum(r.prompt_len for r in told)
    return {
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "hit_share": cached / prompt if prompt else None,
    }


def turn_group(results: Sequence[RequestResult]) -> dict[str, Any]:
    """A group of session turns (the first turns, or the later ones): how many, their
    TTFT percentiles and mean prompt, and their prefix-cache hit share."""
    ttft = [r.ttft for r in results if r.ttft is not None]
    n = len(results)
    return {
        "count": n,
        "prompt_mean": sum(r.prompt_len for r in results) / n if n else None,
        "ttft": {f"p{q}": percentile(ttft, q) for q in (50, 90)},
        "prefix_cache": prefix_cache_share(results),
    }


def phase_breakdown(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Per phase, the durations of the requests whose server timings cover it."""
    out: dict[str, list[float]] = {}
    for r in results:
        ts = r.server
        for name, (a, b) in PHASES.items():
            start = ts.get(a) if name != "decode_queue" else ts.get(a, ts.get("prefill_end"))
            if start is not None and b in ts:
                out.setdefault(name, []).append(max(0.0, ts[b] - start))
    return out
