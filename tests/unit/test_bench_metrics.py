"""SLO metrics on fixed inputs, checked against hand computation."""

from __future__ import annotations

import math

import pytest

from distserve.bench.metrics import (
    attainment,
    goodput,
    goodput_interval,
    min_slo_scale,
    percentile,
    phase_breakdown,
    summarize,
)
from distserve.bench.results import RequestResult


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


def test_calibration_scales_with_and_without_contention() -> None:
    from distserve.bench.calibrate import Calibration

    cal = Calibration(1.05, 0.003, 1.2, contention={"prefill": (1.0, 1.1), "decode": (1.15, None)})
    seq = {"decode_seq_time": 0.0}
    assert cal.scales(contention=False) == {"compute_scale": 1.05, "decode_scale": 1.2} | seq
    # decode has no contended reading: its total stays, unsplit
    assert cal.scales() == {"compute_scale": 1.0, "contended_scale": 1.1, "decode_scale": 1.2} | seq
    assert Calibration(1.0, 0.0).scales() == {"compute_scale": 1.0, "decode_scale": None} | seq
    assert Calibration(1.0, 0.0, decode_seq_time=0.002).scales()["decode_seq_time"] == 0.002


def _trace_line(inst: str, t: float, exec_s: float, prefill=(), starts=(), decode=()) -> str:  # type: ignore[no-untyped-def]
    import json

    return json.dumps(
        {
            "instance": inst,
            "t": t,
            "seconds": exec_s + 0.001,
            "exec": exec_s,
            "prefill": list(prefill),
            "prefill_start": list(starts),
            "decode": list(decode),
        }
    )


def test_trace_fit_recovers_the_scales_of_mixed_and_pure_steps() -> None:
    """A trace made from known scales (prompt 1.3x, decode 2.0x the profile) and a known
    4 ms per step outside the model: the fit gets them back from prompt-only, decode-only
    and mixed steps (chunks that start mid-prompt included)."""
    from distserve.bench.calibrate import trace_fit
    from distserve.sim.latency import step_parts
    from distserve.sim.profile import Profile

    prof = Profile(
        "m",
        "cpu",
        prefill=(0.01, 1e-3, 1e-7),
        decode_small=(0.02, 1e-6, 1e-3),
        decode_large=(0.025, 1e-6, 5e-4),
        decode_threshold=8,
    )
    shapes = [
        ([100], [0], []),
        ([], [], [50, 60]),
        ([30], [200], [10, 20, 30]),
        ([512], [0], [5] * 9),
        ([], [], [300] * 12),
    ]
    lines, t = [], 0.0
    for pf, st, dc in shapes * 3:
        p, d = step_parts(prof, list(zip(st, pf, strict=True)), dc)
        ex = 1.3 * p + 2.0 * d
        lines.append(_trace_line("i0", t, ex, pf, st, dc))
        t += ex + 0.004
    fit = trace_fit(lines, prof)
    assert fit is not None and fit.steps == 15
    assert fit.prefill_scale == pytest.approx(1.3)
    assert fit.decode_scale == pytest.approx(2.0)
    assert fit.median_rel_error == pytest.approx(0.0, abs=1e-9)
    assert fit.step_overhead == pytest.approx(0.004)
    assert fit.noise == pytest.approx(0.0, abs=1e-9)
    assert fit.sim_options()["compute_scale"] == pytest.approx(1.3)
    decode_only = trace_fit(lines[1:2], prof)
    assert decode_only is not None and decode_only.prefill_scale is None
    assert decode_only.decode_scale == pytest.approx(2.0)
    assert decode_only.sim_options()["compute_scale"] == pytest.approx(2.0)
    assert trace_fit([], prof) is None


def test_trace_fit_separates_a_per_request_decode_time_from_the_scales() -> None:
    """Served decode steps that pay 2 ms per request beyond the first on top of 1.1x the
    profile (prompts 1.3x): the fit gets all three back, the per-phase ratios of the
    trace are those of what remains, and a model with them times every step right."""
    from distserve.bench.calibrate import trace_fit, trace_time_ratios
    from distserve.sim.latency import LatencyModel, step_parts
    from distserve.sim.profile import Profile

    prof = Profile("m", "cpu", prefill=(0.01, 1e-3, 1e-7), decode_small=(0.015, 2e-6, 1e-4))
    shapes = [([200], [0], [])] + [
        ([], [], [100 + 40 * i] * b) for i in range(4) for b in (1, 2, 3, 5)
    ]
    lines, t = [], 0.0
    for pf, st, dc in shapes * 3:
        p, d = step_parts(prof, list(zip(st, pf, strict=True)), dc)
        ex = 1.3 * p + 1.1 * d + 0.002 * max(0, len(dc) - 1)
        lines.append(_trace_line("i0", t, ex, pf, st, dc))
        t += ex + 0.004
    fit = trace_fit(lines, prof)
    assert fit is not None
    assert fit.decode_seq_time == pytest.approx(0.002)
    assert fit.decode_scale == pytest.approx(1.1)
    assert fit.prefill_scale == pytest.approx(1.3)
    assert fit.median_rel_error == pytest.approx(0.0, abs=1e-9)
    assert trace_time_ratios(lines, prof, fit.decode_seq_time)[1] == pytest.approx(1.1)
    assert trace_time_ratios(lines, prof)[1] > 1.2  # unseparated, the batches inflate it
    lat = LatencyModel(prof, decode_scale=1.1, decode_seq_time=0.002)
    step = 1.1 * prof.decode_time([300] * 3) + 2 * 0.002
    assert lat.decode_steps_time([300] * 3, 1) == pytest.approx(step)
    # too few batched steps to tell a per-request time from the scale: none
    few = trace_fit(lines[:10], prof)
    assert few is not None and few.decode_seq_time == 0.0


def test_trace_fit_keeps_each_phase_total_when_steps_are_noisy() -> None:
    """Steps 30% slower and faster by turns around known scales (prompt 1.5x, decode
    1.2x): the fit keeps the totals (what a replay must reproduce), where a fit on
    relative error would read low; with mixed steps, the fitted total is the trace's."""
    from distserve.bench.calibrate import trace_fit
    from distserve.sim.latency import step_parts
    from distserve.sim.profile import Profile

    prof = Profile("m", "cpu", prefill=(0.01, 1e-3, 1e-7), decode_small=(0.02, 1e-6, 1e-3))
    shapes = [([200], [0], []), ([], [], [100, 200]), ([64], [128], [50] * 3)]
    lines, t, total, parts = [], 0.0, 0.0, []
    for i, (pf, st, dc) in enumerate(shapes * 4):
        p, d = step_parts(prof, list(zip(st, pf, strict=True)), dc)
        noise = 1.3 if (i // len(shapes)) % 2 else 0.7
        ex = (1.5 * p + 1.2 * d) * noise
        lines.append(_trace_line("i0", t, ex, pf, st, dc))
        parts.append((p, d))
        total += ex
        t += ex + 0.004
    pure = [ln for ln, (pf, _, dc) in zip(lines, shapes * 4, strict=True) if not (pf and dc)]
    fit = trace_fit(pure, prof)
    assert fit is not None
    assert fit.prefill_scale == pytest.approx(1.5)
    assert fit.decode_scale == pytest.approx(1.2)
    assert fit.noise == pytest.approx(math.log(1.3 / 0.7) / 2)  # the spread around the fit
    mixed = trace_fit(lines, prof)
    assert mixed is not None and mixed.prefill_scale and mixed.decode_scale
    fitted = sum(mixed.prefill_scale * p + mixed.decode_scale * d for p, d in parts)
    assert fitted == pytest.approx(total)


def test_a_trace_span_reads_the_same_lines_gzipped(tmp_path) -> None:
    """The byte span of what a run read from a growing trace gives back those lines,
    from the raw file and after it is gzipped (a partial last line is left out)."""
    from distserve.bench.calibrate import gzip_file, span_end, trace_lines_since, trace_spans

    trace = str(tmp_path / "steps.jsonl")
    with open(trace, "w") as f:
        f.write('{"a": 1}\n{"b": "é"}\n')
    start = len(b'{"a": 1}\n')
    with open(trace, "a") as f:
        f.write('{"c": 3}\n{"d": 4}\n{"partial"')
    lines = trace_lines_since(trace, start)
    assert lines == ['{"b": "é"}', '{"c": 3}', '{"d": 4}']
    span = (start, span_end(start, lines))
    first = (0, start)
    assert trace_spans(trace, [span, first]) == [lines, ['{"a": 1}']]
    gzip_file(trace)
    assert not (tmp_path / "steps.jsonl").exists()
    assert trace_spans(trace, [span, first]) == [lines, ['{"a": 1}']]


def test_contention_counts_the_other_instances_decode_steps() -> None:
    """A prompt step of instance a that overlaps b's decode steps reads as contended; one
    that overlaps b's prompt step (or nothing) as uncontended."""
    from distserve.bench.calibrate import contention_ratios
    from distserve.sim.profile import Profile

    prof = Profile("m", "cpu", prefill=(0.0, 1e-3, 0.0), decode_small=(0.01, 0.0, 0.0))
    lines = [
        _trace_line("a", 0.0, 0.1, [100], [0], []),  # b idle: 1.0x
        _trace_line("a", 1.0, 0.12, [100], [0], []),  # b computes a prompt: 1.2x
        _trace_line("b", 1.0, 0.2, [200], [0], []),
        _trace_line("a", 2.0, 0.15, [100], [0], []),  # b decodes: 1.5x
        *[_trace_line("b", 2.0 + 0.01 * i, 0.01, [], [], [300]) for i in range(20)],
    ]
    ratios = contention_ratios(lines, prof)
    idle, busy = ratios["prefill"]
    assert idle == pytest.approx((0.1 + 0.12 + 0.2) / (0.1 + 0.1 + 0.2))  # b's prompt too
    assert busy == pytest.approx(1.5)
