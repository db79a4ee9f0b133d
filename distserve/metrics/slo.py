"""SLO attainment of request results, and the smallest SLO scale a run attains."""

from __future__ import annotations

import math
from collections.abc import Sequence

from distserve.metrics.results import RequestResult


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
