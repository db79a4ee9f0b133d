"""SLO metrics on fixed inputs, checked against hand computation."""

from __future__ import annotations

import math

import pytest

from distserve.metrics.goodput import goodput, goodput_interval
from distserve.metrics.results import RequestResult
from distserve.metrics.slo import attainment, min_slo_scale
from distserve.metrics.summary import percentile, phase_breakdown, summarize


def _r(
    ttft: float | None, tpot: float | None, error: str | None = None, **server: float
) -> RequestResult:
    return RequestResult(
        0,
        10,
        10,
        0.0,
        ttft=ttft,
        tpot=tpot,
        e2e=(ttft or 0) + 9 * (tpot or 0),
        num_tokens=10,
        error=error,
        server=dict(server),
    )


RESULTS = [
    _r(0.1, 0.01),
    _r(0.3, 0.01),
    _r(0.1, 0.05),
    _r(0.5, 0.08),
    _r(None, None, error="HTTP 500"),
]


def test_attainment_by_hand() -> None:
    # SLO ttft 0.2, tpot 0.04: request 0 meets both; 1 misses TTFT; 2 misses TPOT;
    # 3 misses both; 4 failed.
    att = attainment(RESULTS, 0.2, 0.04)
    assert att == {"both": 1 / 5, "ttft": 2 / 5, "tpot": 2 / 5}


def test_goodput_interpolates_at_the_crossing() -> None:
    pts = [(1.0, 1.0), (2.0, 0.95), (3.0, 0.85), (4.0, 0.5)]
    # between 2 (0.95) and 3 (0.85): 0.9 is crossed half way
    assert goodput(pts, 0.9) == pytest.approx(2.5)
    assert goodput([(1.0, 0.8)], 0.9) == 0.0
    assert goodput([(1.0, 0.99), (2.0, 0.95)], 0.9) == 2.0  # never missed: the top rate
    # the first fall below target counts, even if a later point recovers
    assert goodput([(1, 1.0), (2, 0.8), (3, 0.95)], 0.9) == pytest.approx(1.5)


def test_goodput_interval_brackets_the_estimate_and_narrows_with_more_requests() -> None:
    # every request met at both rates: no draw can miss, the interval is the top rate
    assert goodput_interval([(1.0, [True] * 60), (2.0, [True] * 60)]) == (2.0, 2.0)

    def sweep(n: int) -> list[tuple[float, list[bool]]]:
        # attainment 97.5%, 92.5%, 85% at rates 1, 2, 3, the misses spread out:
        # goodput 2 + (0.925 - 0.9) / 0.075
        return [
            (r, [(37 * i) % n >= round((1 - a) * n) for i in range(n)])
            for r, a in ((1.0, 0.975), (2.0, 0.925), (3.0, 0.85))
        ]

    small, large = sweep(40), sweep(400)
    for s in (small, large):
        assert [sum(m) / len(m) for _, m in s] == [0.975, 0.925, 0.85]
    point = goodput([(r, sum(m) / len(m)) for r, m in large])
    assert point == pytest.approx(2 + 1 / 3)
    lo, hi = goodput_interval(large)
    assert lo < point < hi
    s_lo, s_hi = goodput_interval(small)
    assert s_hi - s_lo > 2 * (hi - lo)  # a tenth of the requests: about sqrt(10) wider
    assert goodput_interval(large, seed=3) == goodput_interval(large, seed=3)


def test_min_slo_scale_exact() -> None:
    ok = RESULTS[:4]
    # per-request thresholds for 'both' with base (0.2, 0.04):
    # max(0.5, .25), max(1.5, .25), max(.5, 1.25), max(2.5, 2)
    assert min_slo_scale(ok, 0.2, 0.04, target=0.5) == pytest.approx(1.25)
    assert min_slo_scale(ok, 0.2, 0.04, target=0.75) == pytest.approx(1.5)
    assert min_slo_scale(ok, 0.2, 0.04, target=1.0) == pytest.approx(2.5)
    # scaling TTFT only, TPOT held at 0.04: requests 2 and 3 can never attain
    assert min_slo_scale(ok, 0.2, 0.04, target=0.5, scale="ttft") == pytest.approx(1.5)
    assert math.isinf(min_slo_scale(ok, 0.2, 0.04, target=0.75, scale="ttft"))
    assert math.isinf(
        min_slo_scale(RESULTS, 0.2, 0.04, target=1.0)
    )  # a failed request never attains
    with pytest.raises(ValueError):
        min_slo_scale(ok, 0.2, 0.04, scale="nope")


def test_percentiles_and_summary() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([], 50) is None
    s = summarize(RESULTS, 0.2, 0.04, duration=10.0)
    assert s["completed"] == 4 and s["errors"] == 1
    assert s["throughput_rps"] == 0.4 and s["output_tokens_per_s"] == 4.0
    assert s["ttft"]["p50"] == pytest.approx(0.2)
    # both TPOTs: the paper's (gaps after the first token) and e2e / tokens (guidellm's)
    assert s["tpot"]["mean"] == pytest.approx((0.01 + 0.01 + 0.05 + 0.08) / 4)
    per_token = [(0.1 + 0.09) / 10, (0.3 + 0.09) / 10, (0.1 + 0.45) / 10, (0.5 + 0.72) / 10]
    assert s["time_per_output_token"]["mean"] == pytest.approx(sum(per_token) / 4)
    assert "guidellm" in s["tpot_definitions"]["time_per_output_token"]


def test_phase_breakdown_from_server_milestones() -> None:
    r = _r(
        0.1,
        0.01,
        arrived=0.0,
        prefill_start=0.2,
        prefill_end=0.5,
        migration_start=0.6,
        migration_end=0.65,
        decode_start=0.7,
        decode_end=1.7,
    )
    colo = _r(
        0.1, 0.01, arrived=0.0, prefill_start=0.1, prefill_end=0.3, decode_start=0.4, decode_end=1.0
    )
    ph = phase_breakdown([r, colo])
    assert ph["prefill_queue"] == pytest.approx([0.2, 0.1])
    assert ph["migration"] == pytest.approx([0.05])
    assert ph["decode_queue"] == pytest.approx([0.05, 0.1])  # colocated: from prefill end
    assert ph["decode"] == pytest.approx([1.0, 0.6])
