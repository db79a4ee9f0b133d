"""Reading a step trace: the fit of every step (scales, step overhead, per-request decode
time, noise), the ratios with the other instances idle or busy, and spans of trace files,
on traces made from known numbers."""

from __future__ import annotations

import math

import pytest

from distserve.sim.latency import LatencyModel, step_parts
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath
from distserve.sim.trace_files import gzip_file, span_end, trace_lines_since, trace_spans
from distserve.sim.trace_fit import (
    TraceFit,
    contention_ratios,
    trace_fit,
    trace_time_ratios,
)


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
    assert fit.path.decode_scale == pytest.approx(2.0)
    assert fit.median_rel_error == pytest.approx(0.0, abs=1e-9)
    assert fit.path.step_overhead == pytest.approx(0.004)
    assert fit.noise == pytest.approx(0.0, abs=1e-9)
    assert fit.path.compute_scale == pytest.approx(1.3)
    assert not fit.path.contended  # the fit averages the contention in
    decode_only = trace_fit(lines[1:2], prof)
    assert decode_only is not None and decode_only.prefill_scale is None
    assert decode_only.path.decode_scale == pytest.approx(2.0)
    assert decode_only.path.compute_scale == pytest.approx(2.0)
    for f in (fit, decode_only):  # as results files keep it
        assert TraceFit.from_dict(f.to_dict()) == f
    assert trace_fit([], prof) is None


def test_trace_fit_separates_a_per_request_decode_time_from_the_scales() -> None:
    """Served decode steps that pay 2 ms per request beyond the first on top of 1.1x the
    profile (prompts 1.3x): the fit gets all three back, the per-phase ratios of the
    trace are those of what remains, and a model with them times every step right."""
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
    assert fit.path.decode_seq_time == pytest.approx(0.002)
    assert fit.path.decode_scale == pytest.approx(1.1)
    assert fit.prefill_scale == pytest.approx(1.3)
    assert fit.median_rel_error == pytest.approx(0.0, abs=1e-9)
    assert trace_time_ratios(lines, prof, fit.path.decode_seq_time)[1] == pytest.approx(1.1)
    assert trace_time_ratios(lines, prof)[1] > 1.2  # unseparated, the batches inflate it
    lat = LatencyModel(prof, ServingPath(decode_scale=1.1, decode_seq_time=0.002))
    step = 1.1 * prof.decode_time([300] * 3) + 2 * 0.002
    assert lat.decode_steps_time([300] * 3, 1) == pytest.approx(step)
    # too few batched steps to tell a per-request time from the scale: none
    few = trace_fit(lines[:10], prof)
    assert few is not None and few.path.decode_seq_time == 0.0


def test_trace_fit_keeps_each_phase_total_when_steps_are_noisy() -> None:
    """Steps 30% slower and faster by turns around known scales (prompt 1.5x, decode
    1.2x): the fit keeps the totals (what a replay must reproduce), where a fit on
    relative error would read low; with mixed steps, the fitted total is the trace's."""
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
    assert fit.path.decode_scale == pytest.approx(1.2)
    assert fit.noise == pytest.approx(math.log(1.3 / 0.7) / 2)  # the spread around the fit
    mixed = trace_fit(lines, prof)
    assert mixed is not None and mixed.prefill_scale and mixed.path.decode_scale
    fitted = sum(mixed.prefill_scale * p + mixed.path.decode_scale * d for p, d in parts)
    assert fitted == pytest.approx(total)


def test_a_trace_span_reads_the_same_lines_gzipped(tmp_path) -> None:
    """The byte span of what a run read from a growing trace gives back those lines,
    from the raw file and after it is gzipped (a partial last line is left out)."""
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
