"""The serving path read off a step trace (`serve --trace-steps`): each step's model time
against the profile's, whole-run ratios, the ratios with the other instances idle or
busy, and the fit of every step (`trace_fit`) that replays a run at its own speed."""

from __future__ import annotations

import bisect
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from distserve.sim.latency import step_parts
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath

MIN_BATCHED_STEPS = 20
"""Decode steps of more than one request a trace needs for its per-request time."""

Step = dict[str, Any]
"""One line of a step trace: instance, t (start), seconds, exec (model time), prefill
(tokens per chunk), prefill_start (each chunk's first position), decode (contexts)."""


def _phase_steps(
    lines: list[str], profile: Profile, decode_seq_time: float = 0.0
) -> list[tuple[Step, str, float, float]]:
    """(step, phase, the profile's time for it, the step's model time less its
    per-request decode time) of each prefill-only (first chunks only) and each
    decode-only step of a step trace."""
    out = []
    for line in lines:
        s = json.loads(line)
        if s["prefill"] and not s["decode"] and not any(s.get("prefill_start", [])):
            out.append((s, "prefill", profile.prefill_time(s["prefill"]), s["exec"]))
        elif s["decode"] and not s["prefill"]:
            own = s["exec"] - decode_seq_time * (len(s["decode"]) - 1)
            out.append((s, "decode", profile.decode_time(s["decode"]), own))
    return out


def trace_scales(lines: list[str], profile: Profile) -> tuple[list[float], list[float]]:
    """The model's own time over the profile's, per prefill-only and per decode-only step."""
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for s, phase, model, _ in _phase_steps(lines, profile):
        ratios[phase].append(s["exec"] / model)
    return ratios["prefill"], ratios["decode"]


def _ratio(acc: list[float]) -> float | None:
    return acc[0] / acc[1] if acc[1] else None


def trace_time_ratios(
    lines: list[str], profile: Profile, decode_seq_time: float = 0.0
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
    profile: Profile,
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
    by = _by_instance([json.loads(line) for line in lines])
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


def _by_instance(steps: list[Step]) -> dict[str, list[Step]]:
    """Each instance's steps in order of their start."""
    by: dict[str, list[Step]] = {}
    for s in steps:
        by.setdefault(s["instance"], []).append(s)
    for v in by.values():
        v.sort(key=lambda s: s["t"])
    return by


@dataclass(frozen=True)
class TraceFit:
    """The serving path that best explains one run's step trace, and how well it does."""

    path: ServingPath
    """The fitted step overhead, decode scale and per-request decode time, and as compute
    scale the prompt part's (the decode part's where the trace has no prompt step). No
    contention: the fit averages it."""
    prefill_scale: float | None
    """The prompt part's scale as fitted; None where the trace has no prompt step."""
    steps: int
    median_rel_error: float
    """Of the fitted model time against each step's measured model time."""
    noise: float = 0.0
    """Standard deviation of log(measured / fitted) over the steps: how much a step's
    time varies around the fit (`SimConfig.step_noise`)."""

    def to_dict(self) -> dict[str, Any]:
        """The form results files keep a fit in."""
        return {
            "prefill_scale": self.prefill_scale,
            "decode_scale": self.path.decode_scale,
            "step_overhead": self.path.step_overhead,
            "steps": self.steps,
            "median_rel_error": self.median_rel_error,
            "noise": self.noise,
            "decode_seq_time": self.path.decode_seq_time,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceFit:
        """A fit as `to_dict` wrote it (runs before the per-request decode time or the
        noise were fitted lack them: 0)."""
        return cls.of(
            d["prefill_scale"],
            d["decode_scale"],
            d["step_overhead"],
            d.get("decode_seq_time", 0.0),
            d["steps"],
            d["median_rel_error"],
            d.get("noise", 0.0),
        )

    @classmethod
    def of(
        cls,
        prefill_scale: float | None,
        decode_scale: float | None,
        step_overhead: float,
        decode_seq_time: float,
        steps: int,
        median_rel_error: float,
        noise: float,
    ) -> TraceFit:
        """The fit of these scales, overhead and per-request decode time."""
        path = ServingPath(
            step_overhead=step_overhead,
            compute_scale=prefill_scale or decode_scale or 1.0,
            decode_scale=decode_scale,
            decode_seq_time=decode_seq_time,
        )
        return cls(path, prefill_scale, steps, median_rel_error, noise)


def trace_fit(lines: list[str], profile: Profile, back_to_back: float = 0.05) -> TraceFit | None:
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
    seq = fit_decode_seq_time(rows, extra)
    rows = [(p, d, y - seq * m) for (p, d, y), m in zip(rows, extra, strict=True)]
    kp, kd = _phase_scales(rows)
    fitted = [
        (kp or 0) * p + (kd or 0) * d + seq * m for (p, d, _), m in zip(rows, extra, strict=True)
    ]
    measured = [y + seq * m for (*_, y), m in zip(rows, extra, strict=True)]
    err = statistics.median(abs(f - y) / y for f, y in zip(fitted, measured, strict=True))
    logs = [math.log(y / f) for f, y in zip(fitted, measured, strict=True) if f > 0]
    noise = statistics.pstdev(logs) if len(logs) > 1 else 0.0
    overhead = max(0.0, statistics.fmean(_outside_model(steps, back_to_back)))
    return TraceFit.of(kp, kd, overhead, seq, len(rows), err, noise)


def _phase_scales(rows: list[tuple[float, float, float]]) -> tuple[float | None, float | None]:
    """(prompt scale, decode scale) of (prompt part, decode part, model time) rows, each
    None where no row has that part: the scales with which the sum over the rows of each
    part's share times the error is zero."""
    # sum over steps of share x (kp p + kd d - y) = 0, share p/(p+d) and d/(p+d)
    pp = sum(p * p / (p + d) for p, d, _ in rows)
    dd = sum(d * d / (p + d) for p, d, _ in rows)
    pd = sum(p * d / (p + d) for p, d, _ in rows)
    py = sum(p * y / (p + d) for p, d, y in rows)
    dy = sum(d * y / (p + d) for p, d, y in rows)
    det = pp * dd - pd * pd
    if pp > 0 and dd > 0 and det > 1e-9 * pp * dd:
        return (py * dd - dy * pd) / det, (dy * pp - py * pd) / det
    # one kind of step only (or every step the same mix): one scale of the totals
    k = sum(y for *_, y in rows) / sum(p + d for p, d, _ in rows)
    return (k if pp > 0 else None), (k if dd > 0 else None)


def _outside_model(steps: list[Step], back_to_back: float) -> list[float]:
    """Per step that follows its instance's previous one within `back_to_back` seconds,
    the time between their starts not spent in the model; without any, each step's time
    outside its model."""
    outside = []
    for v in _by_instance(steps).values():
        for a, b in zip(v, v[1:], strict=False):
            if b["t"] - (a["t"] + a["seconds"]) < back_to_back:
                outside.append(b["t"] - a["t"] - a["exec"])
    return outside or [s["seconds"] - s["exec"] for s in steps]


def fit_decode_seq_time(rows: list[tuple[float, float, float]], extra: list[int]) -> float:
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
