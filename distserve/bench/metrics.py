"""SLO attainment, latency percentiles, goodput from a rate sweep, and the SLO-scale
search. Pure functions of request results, shared by real and simulated runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from distserve.bench.results import RequestResult

PHASES = {
    "prefill_queue": ("arrived", "prefill_start"),
    "prefill": ("prefill_start", "prefill_end"),
    "migration_queue": ("prefill_end", "migration_start"),
    "migration": ("migration_start", "migration_end"),
    "decode_queue": ("migration_end", "decode_start"),
    "decode": ("decode_start", "decode_end"),
}
"""Phase name -> (start milestone, end milestone) in the server's per-request timings."""


def attains(r: RequestResult, ttft_slo: float, tpot_slo: float) -> tuple[bool, bool]:
    """(meets TTFT, meets TPOT); a failed request meets neither."""
    if not r.ok:
        return False, False
    assert r.ttft is not None
    return r.ttft <= ttft_slo, (r.tpot or 0.0) <= tpot_slo


def attainment(
    results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float
) -> dict[str, float]:
    """Share of requests meeting both targets, TTFT only and TPOT only."""
    if not results:
        return {"both": 0.0, "ttft": 0.0, "tpot": 0.0}
    pairs = [attains(r, ttft_slo, tpot_slo) for r in results]
    n = len(pairs)
    return {
        "both": sum(a and b for a, b in pairs) / n,
        "ttft": sum(a for a, _ in pairs) / n,
        "tpot": sum(b for _, b in pairs) / n,
    }


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
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
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
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        summary[name] = {f"p{q}": percentile(vals, q) for q in (50, 90, 99)} | {
            "mean": sum(vals) / len(vals) if vals else None
        }
    breakdown = phase_breakdown(ok)
    if breakdown:
        summary["phases_median"] = {k: percentile(v, 50) for k, v in breakdown.items()}
    return summary


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


def goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """The highest rate whose attainment stays >= target, from (rate, attainment) points:
    the last rate before attainment first falls below target, linearly interpolated to
    where the line between the two crosses target (as the DistServe paper does). If even
    the lowest rate misses, 0; if no rate misses, the highest rate measured (a lower bound)."""
    pts = sorted(points)
    if not pts or pts[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return pts[-1][0]


def goodput_interval(
    runs: Sequence[tuple[float, Sequence[bool]]],
    target: float = 0.9,
    level: float = 0.9,
    draws: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval of `goodput` over a sweep: each rate's per-request outcomes
    (met both targets or not, in arrival order) resampled in circular blocks of
    ceil(sqrt(n)) consecutive requests (a queue makes neighbours miss together), the
    goodput recomputed per draw, and the central `level` share of the draws. It covers
    the sample's own noise only, not the machine's speed moving between rates: at 60
    requests a rate and a flat attainment curve, one request is 1.7 points and can move
    the goodput by 10% or more."""
    import random

    rng = random.Random(seed)
    # per rate: its outcomes, block length and blocks per draw
    shapes = []
    for rate, met in runs:
        b = math.ceil(math.sqrt(len(met))) or 1
        shapes.append((rate, met, b, math.ceil(len(met) / b)))
    values = []
    for _ in range(draws):
        points = []
        for rate, met, b, blocks in shapes:
            n = len(met)
            if n == 0:
                points.append((rate, 0.0))
                continue
            hits = 0
            for _ in range(blocks):
                start = rng.randrange(n)
                hits += sum(met[(start + j) % n] for j in range(b))
            points.append((rate, hits / (b * blocks)))
        values.append(goodput(points, target))
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * (draws - 1))], values[math.ceil((1 - tail) * (draws - 1))]


def met_both(results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float) -> list[bool]:
    """Per request in arrival order (by index): met both targets."""
    ordered = sorted(results, key=lambda r: r.index)
    return [all(attains(r, ttft_slo, tpot_slo)) for r in ordered]


def min_slo_scale(
    results: Sequence[RequestResult],
    ttft_slo: float,
    tpot_slo: float,
    target: float = 0.9,
    scale: str = "both",
) -> float:
    """The smallest factor s such that attainment with the targets scaled by s is >= target.

    `scale`: 'both' scales both targets; 'ttft' or 'tpot' scales that one and keeps the
    other at its base value. Exact: each request attains from its own threshold scale on,
    so the answer is the ceil(target * n)-th smallest threshold (inf if unreachable)."""
    if scale not in ("both", "ttft", "tpot"):
        raise ValueError(f"scale must be both, ttft or tpot, got {scale!r}")
    thresholds = []
    for r in results:
        if not r.ok:
            thresholds.append(math.inf)
            continue
        assert r.ttft is not None
        st, sp = r.ttft / ttft_slo, (r.tpot or 0.0) / tpot_slo
        if scale == "both":
            thresholds.append(max(st, sp))
        elif scale == "ttft":
            thresholds.append(st if sp <= 1.0 else math.inf)
        else:
            thresholds.append(sp if st <= 1.0 else math.inf)
    if not thresholds:
        return math.inf
    k = math.ceil(target * len(thresholds) - 1e-9)
    return sorted(thresholds)[max(k, 1) - 1]
