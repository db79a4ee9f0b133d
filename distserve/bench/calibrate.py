"""Calibrate the simulator against a running server, from lone requests (no queueing or
batching mixed in): how much slower the model runs when serving than when profiled (the
workers share the machine with the API server, the controller and the clients), and the
per-step time the serving path adds outside the model (the round trip to the worker,
sampling, streaming)."""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import math
import os
import shutil
import statistics
from typing import Any

from distserve.bench.client import run_workload
from distserve.workload.spec import Workload

MIN_BATCHED_STEPS = 20
"""Decode steps of more than one request a trace needs for its per-request time."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    compute_scale: float
    """Served prefill time over the profile's."""
    step_overhead: float
    """Seconds per step outside the model, never negative: with a loaded run, the mean
    gap between back-to-back steps' model times in its trace; else the lone requests'
    TPOT beyond the profile's step (scaled)."""
    decode_scale: float | None = None
    """Served decode step time over the profile's, where a step trace shows it."""
    lone: tuple[float, float | None] | None = None
    """(prefill, decode) scales of the lone requests, where a loaded run set the scales."""
    contention: dict[str, tuple[float | None, float | None]] | None = None
    """Per phase, (scale while the other instances are idle, while they are busy), from the
    loaded run: on a CPU the frontend's work takes the workers' time when no core is idle."""
    decode_seq_time: float = 0.0
    """Seconds each decode request beyond the first adds to a step, from the loaded run's
    trace (`trace_fit`); the decode scales are of what remains."""

    def scales(self, contention: bool = True) -> dict[str, float | None]:
        """The latency model's scales (SimOptions / Setting fields) and its per-request
        decode time: with `contention` and a loaded run, idle-neighbour scales plus
        contended ones; else the totals."""
        out: dict[str, float | None] = {
            "compute_scale": self.compute_scale,
            "decode_scale": self.decode_scale,
            "decode_seq_time": self.decode_seq_time,
        }
        if contention and self.contention:
            (p_idle, p_busy), (d_idle, d_busy) = (
                self.contention["prefill"],
                self.contention["decode"],
            )
            if p_idle is not None and p_busy is not None:
                out |= {"compute_scale": p_idle, "contended_scale": p_busy}
            if d_idle is not None and d_busy is not None:
                out |= {"decode_scale": d_idle, "contended_decode_scale": d_busy}
        return out


def _phase_steps(
    lines: list[str], profile: Any, decode_seq_time: float = 0.0
) -> list[tuple[dict[str, Any], str, float, float]]:
    """(step, phase, the profile's time for it, the step's model time less its
    per-request decode time) of each prefill-only (first chunks only) and each
    decode-only step of a step trace (`serve --trace-steps`)."""
    out = []
    for line in lines:
        s = json.loads(line)
        if s["prefill"] and not s["decode"] and not any(s.get("prefill_start", [])):
            out.append((s, "prefill", profile.prefill_time(s["prefill"]), s["exec"]))
        elif s["decode"] and not s["prefill"]:
            own = s["exec"] - decode_seq_time * (len(s["decode"]) - 1)
            out.append((s, "decode", profile.decode_time(s["decode"]), own))
    return out


def trace_scales(lines: list[str], profile: Any) -> tuple[list[float], list[float]]:
    """The model's own time over the profile's, per prefill-only and per decode-only step."""
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for s, phase, model, _ in _phase_steps(lines, profile):
        ratios[phase].append(s["exec"] / model)
    return ratios["prefill"], ratios["decode"]


def _ratio(acc: list[float]) -> float | None:
    return acc[0] / acc[1] if acc[1] else None


def trace_time_ratios(
    lines: list[str], profile: Any, decode_seq_time: float = 0.0
) -> tuple[float | None, float | None]:
    """Total model time over total profile time, of prefill-only and of decode-only steps
    (less `decode_seq_time` per decode request beyond the first): the factor that
    stretches a run's time, where a median would miss the slow tail."""
    sums = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
    for _, phase, model, own in _phase_steps(lines, profile, decode_seq_time):
        sums[phase][0] += own
        sums[phase][1] += model
    return _ratio(sums["prefill"]), _ratio(sums["decode"])


def contention_ratios(
    lines: list[str],
    profile: Any,
    idle_below: float = 0.2,
    busy_above: float = 0.8,
    decode_seq_time: float = 0.0,
) -> dict[str, tuple[float | None, float | None]]:
    """Per phase, model time over profile time of the steps during which the other
    instances were idle (in a step with decode tokens less than `idle_below` of the step)
    and of those during which they were busy so (more than `busy_above`). Only the others'
    decode-bearing steps count: their streamed tokens keep the frontend busy on the same
    cores, which costs a step more than the other instance's prompt does (EPYC traces:
    a prompt step 1.05x the profile with the other instance idle, 1.09x while it computed
    a prompt, 1.23x while it decoded; a decode step 0.98x / 1.08x / 1.31x)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        s = json.loads(line)
        by.setdefault(s["instance"], []).append(s)
    for v in by.values():
        v.sort(key=lambda s: s["t"])
    starts = {k: [s["t"] for s in v] for k, v in by.items()}

    def busy(name: str, a: float, b: float) -> float:
        others = [k for k in by if k != name]
        if not others or b <= a:
            return 0.0
        total = 0.0
        for k in others:
            v, i = by[k], max(0, bisect.bisect_left(starts[k], a) - 1)
            while i < len(v) and v[i]["t"] < b:
                if v[i]["decode"]:
                    total += max(0.0, min(b, v[i]["t"] + v[i]["seconds"]) - max(a, v[i]["t"]))
                i += 1
        return total / (b - a) / len(others)

    sums = {(ph, c): [0.0, 0.0] for ph in ("prefill", "decode") for c in ("idle", "busy")}
    for s, phase, model, own in _phase_steps(lines, profile, decode_seq_time):
        share = busy(s["instance"], s["t"], s["t"] + s["seconds"])
        kind = "idle" if share < idle_below else "busy" if share > busy_above else None
        if kind:
            sums[(phase, kind)][0] += own
            sums[(phase, kind)][1] += model
    return {
        ph: (_ratio(sums[(ph, "idle")]), _ratio(sums[(ph, "busy")])) for ph in ("prefill", "decode")
    }


@dataclasses.dataclass(frozen=True)
class TraceFit:
    """The scales and step overhead that best explain one run's step trace."""

    prefill_scale: float | None
    decode_scale: float | None
    step_overhead: float
    steps: int
    median_rel_error: float
    """Of the fitted model time against each step's measured model time."""
    noise: float = 0.0
    """Standard deviation of log(measured / fitted) over the steps: how much a step's
    time varies around the fit (`SimConfig.step_noise`)."""
    decode_seq_time: float = 0.0
    """Seconds each decode request beyond the first adds to a step (`LatencyModel`)."""

    def sim_options(self) -> dict[str, float | None]:
        """The SimOptions fields these stand for (no contention: the fit averages it)."""
        return {
            "compute_scale": self.prefill_scale or self.decode_scale or 1.0,
            "decode_scale": self.decode_scale,
            "step_overhead": self.step_overhead,
            "decode_seq_time": self.decode_seq_time,
        }


def trace_fit(lines: list[str], profile: Any, back_to_back: float = 0.05) -> TraceFit | None:
    """Fit every step of a trace (prompt-only, decode-only and mixed) as prefill_scale x
    its prompt part + decode_scale x its decode part of the profile's time
    (`sim.latency.step_parts`), and the step overhead as the mean time an instance spends
    per step outside its model when the steps run back to back (within `back_to_back`
    seconds). This is the machine's speed during that run: on a VM whose speed drifts,
    replaying a run through the simulator with its own fit separates what the simulator
    gets wrong from what the machine did. None for a trace with no steps.

    The scales keep each phase's total time: each step's error counts toward a phase by
    that phase's share of the step, and both shares sum to zero (for pure steps, the
    ratio of the totals). A least-squares fit on relative error reads low wherever the
    times are noisy (it weighs a step by 1/time^2, so the slow ones count least): on the
    Xeon's step traces its scales ran 2-8% under the totals, and replays ran that much
    fast (design note 18)."""
    from distserve.sim.latency import step_parts

    steps = [json.loads(line) for line in lines if line.strip()]
    rows, extra = [], []
    for s in steps:
        starts = s.get("prefill_start") or [0] * len(s["prefill"])
        p, d = step_parts(profile, list(zip(starts, s["prefill"], strict=True)), s["decode"])
        if s["exec"] > 0 and p + d > 0:
            rows.append((p, d, s["exec"]))
            extra.append(max(0, len(s["decode"]) - 1))
    if not rows:
        return None
    seq = decode_seq_time(rows, extra)
    rows = [(p, d, y - seq * m) for (p, d, y), m in zip(rows, extra, strict=True)]
    # sum over steps of share x (kp p + kd d - y) = 0, share p/(p+d) and d/(p+d)
    pp = sum(p * p / (p + d) for p, d, _ in rows)
    dd = sum(d * d / (p + d) for p, d, _ in rows)
    pd = sum(p * d / (p + d) for p, d, _ in rows)
    py = sum(p * y / (p + d) for p, d, y in rows)
    dy = sum(d * y / (p + d) for p, d, y in rows)
    det = pp * dd - pd * pd
    kp: float | None
    kd: float | None
    if pp > 0 and dd > 0 and det > 1e-9 * pp * dd:
        kp, kd = (py * dd - dy * pd) / det, (dy * pp - py * pd) / det
    else:  # one kind of step only (or every step the same mix): one scale of the totals
        k = sum(y for *_, y in rows) / sum(p + d for p, d, _ in rows)
        kp = k if pp > 0 else None
        kd = k if dd > 0 else None
    fitted = [
        (kp or 0) * p + (kd or 0) * d + seq * m for (p, d, _), m in zip(rows, extra, strict=True)
    ]
    measured = [y + seq * m for (*_, y), m in zip(rows, extra, strict=True)]
    err = statistics.median(abs(f - y) / y for f, y in zip(fitted, measured, strict=True))
    logs = [math.log(y / f) for f, y in zip(fitted, measured, strict=True) if f > 0]
    noise = statistics.pstdev(logs) if len(logs) > 1 else 0.0
    by: dict[str, list[dict[str, Any]]] = {}
    for s in steps:
        by.setdefault(s["instance"], []).append(s)
    outside = []
    for v in by.values():
        v.sort(key=lambda s: s["t"])
        for a, b in zip(v, v[1:], strict=False):
            if b["t"] - (a["t"] + a["seconds"]) < back_to_back:
                outside.append(b["t"] - a["t"] - a["exec"])
    if not outside:
        outside = [s["seconds"] - s["exec"] for s in steps]
    return TraceFit(kp, kd, max(0.0, statistics.fmean(outside)), len(rows), err, noise, seq)


def decode_seq_time(rows: list[tuple[float, float, float]], extra: list[int]) -> float:
    """Seconds each decode request beyond the first adds to a step, on top of the scaled
    profile, from the decode-only steps among `rows` ((prompt part, decode part,
    measured) with `extra` requests beyond the first each): the two moment equations that
    keep the steps' total time and leave their error uncorrelated with the batch size.
    0 where fewer than MIN_BATCHED_STEPS steps decode more than one request (or the fit
    says less than nothing)."""
    dec = [(d, m, y) for (p, d, y), m in zip(rows, extra, strict=True) if p == 0 and d > 0]
    if sum(m > 0 for _, m, _ in dec) < MIN_BATCHED_STEPS:
        return 0.0
    s_d = sum(d for d, _, _ in dec)
    s_m = sum(m for _, m, _ in dec)
    s_y = sum(y for _, _, y in dec)
    s_dm = sum(d * m for d, m, _ in dec)
    s_mm = sum(m * m for _, m, _ in dec)
    s_ym = sum(y * m for _, m, y in dec)
    det = s_d * s_mm - s_m * s_dm
    if det <= 1e-12 * s_d * s_mm:
        return 0.0
    return max(0.0, (s_d * s_ym - s_dm * s_y) / det)


def trace_lines_since(trace: str, start: int) -> list[str]:
    with open(trace) as f:
        f.seek(start)
        return f.read().split("\n")[:-1]  # whole lines only: the server may be writing


def gzip_file(path: str) -> None:
    """Compress `path` to `path`.gz and remove it (a step trace, kept with results)."""
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(path)


def remove_trace(path: str) -> None:
    """Remove a step trace left by an earlier run, raw or gzipped (a server appends)."""
    for old in (path, path + ".gz"):
        if os.path.exists(old):
            os.remove(old)


def span_end(start: int, lines: list[str]) -> int:
    """The byte offset just past `lines`, read from `start` of a trace."""
    return start + sum(len(line.encode()) + 1 for line in lines)


def trace_spans(trace: str, spans: list) -> list[list[str]]:
    """The whole lines of a trace between each (start, end) pair of byte offsets; the
    trace may be gzipped (`trace` + '.gz', as results are kept)."""
    if not os.path.exists(trace) and os.path.exists(trace + ".gz"):
        with gzip.open(trace + ".gz", "rb") as g:
            data = g.read()
    else:
        with open(trace, "rb") as f:
            data = f.read()
    return [data[start:end].decode().split("\n")[:-1] for start, end in spans]


async def calibrate(
    url: str,
    model: str,
    profile: Any,
    workload: Workload,
    reps: int = 5,
    output_len: int = 32,
    trace: str | None = None,
    load: Workload | None = None,
) -> Calibration:
    """Send `reps` of the workload's requests alone, one after another (after a warm-up),
    at evenly spaced quantiles of its prompt lengths, so that the profile's fit error at
    any one length does not become the scale; compare each one's server-side prefill time
    with the profile's prefill, and its TPOT with the profile's decode step at its context
    (medians over the requests). With the server's step trace, the model's own time of
    each step gives the scales of prefill and decode apart, without the round trip; with a
    `load` workload too (requests at a rate, none of those measured later), the scales are
    those of that run: on a CPU the model runs slower when both cores are busy and the
    frontend streams tokens than for a lone request."""
    by_len = sorted(workload.requests, key=lambda r: r.prompt_len)
    picks = [by_len[len(by_len) // 2]] + [
        by_len[min(len(by_len) - 1, int((i + 0.5) * len(by_len) / reps))] for i in range(reps)
    ]
    scales, tpots, contexts = [], [], []
    start = 0
    for i, req in enumerate(picks):
        if i == 1 and trace:
            start = os.path.getsize(trace)
        alone = Workload(
            (dataclasses.replace(req, index=0, arrival=0.0, output_len=output_len),), {}
        )
        (res,), _ = await run_workload(url, alone, model, progress=False)
        if not res.ok:
            raise RuntimeError(f"calibration request failed: {res.error}")
        if i == 0:
            continue  # warm-up: first-touch of the cache blocks, allocator growth
        s = res.server
        if "prefill_start" in s and "prefill_end" in s:
            scales.append(
                (s["prefill_end"] - s["prefill_start"]) / profile.prefill_time([req.prompt_len])
            )
        tpots.append(res.tpot or 0.0)
        contexts.append(req.prompt_len + output_len // 2)
    decode_scale = None
    if trace:
        prefill, decode = trace_scales(trace_lines_since(trace, start), profile)
        scales = prefill or scales
        decode_scale = statistics.median(decode) if decode else None
    scale = statistics.median(scales) if scales else 1.0
    step_scale = scale if decode_scale is None else decode_scale
    overhead = statistics.median(
        t - step_scale * profile.decode_time([c]) for t, c in zip(tpots, contexts, strict=True)
    )
    cal = Calibration(scale, max(0.0, overhead), decode_scale)
    if trace is None or load is None:
        return cal
    start = os.path.getsize(trace)
    results, _ = await run_workload(url, load, model, progress=False)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration requests failed: {failed[0]}")
    lines = trace_lines_since(trace, start)
    fit = trace_fit(lines, profile)
    seq = fit.decode_seq_time if fit else 0.0
    loaded_prefill, loaded_decode = trace_time_ratios(lines, profile, seq)
    return dataclasses.replace(
        cal,
        compute_scale=loaded_prefill or scale,
        decode_scale=loaded_decode or decode_scale,
        decode_seq_time=seq,
        # measured between back-to-back steps, not left over from lone TPOTs after the
        # modelled step (which took in the lone requests' own speed: 9.3 ms against the
        # trace's 5.6 ms on the Xeon's colocated server)
        step_overhead=fit.step_overhead if fit else cal.step_overhead,
        lone=(scale, decode_scale),
        contention=contention_ratios(lines, profile, decode_seq_time=seq),
    )
