"""Calibrate the simulator against a running server, from lone requests (no queueing or
batching mixed in): how much slower the model runs when serving than when profiled (the
workers share the machine with the API server, the controller and the clients), and the
per-step time the serving path adds outside the model (the round trip to the worker,
sampling, streaming). Reading a step trace is the simulator's (`sim/trace_fit.py`); this
module drives the live server."""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

from distserve.bench.client import run_workload
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath
from distserve.sim.trace_files import trace_lines_since
from distserve.sim.trace_fit import contention_ratios, trace_fit, trace_scales, trace_time_ratios
from distserve.workload.spec import Workload


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A server's serving path as measured, and the readings behind its scales."""

    path: ServingPath
    """compute_scale: served prefill time over the profile's; decode_scale: the same for
    decode steps, where a step trace shows it; decode_seq_time: seconds each decode
    request beyond the first adds to a step, from the loaded run's trace (`trace_fit`;
    the decode scales are of what remains); step_overhead: seconds per step outside the
    model, never negative: with a loaded run, the mean gap between back-to-back steps'
    model times in its trace, else the lone requests' TPOT beyond the profile's step
    (scaled). The scales are totals over the run, contention averaged in."""
    lone: tuple[float, float | None] | None = None
    """(prefill, decode) scales of the lone requests, where a loaded run set the scales."""
    contention: dict[str, tuple[float | None, float | None]] | None = None
    """Per phase, (scale while the other instances are idle, while they are busy), from the
    loaded run: on a CPU the frontend's work takes the workers' time when no core is idle."""

    def serving_path(self, contention: bool = True) -> ServingPath:
        """The simulator's serving path: with `contention` and a loaded run, idle-neighbour
        scales plus contended ones (a phase keeps its total where either reading is
        missing); else the totals."""
        path = self.path
        if contention and self.contention:
            (p_idle, p_busy), (d_idle, d_busy) = (
                self.contention["prefill"],
                self.contention["decode"],
            )
            if p_idle is not None and p_busy is not None:
                path = dataclasses.replace(path, compute_scale=p_idle, contended_scale=p_busy)
            if d_idle is not None and d_busy is not None:
                path = dataclasses.replace(path, decode_scale=d_idle, contended_decode_scale=d_busy)
        return path

    def to_dict(self) -> dict[str, Any]:
        """The form results files keep a calibration in: the knobs it measured and the
        readings, side by side."""
        p = self.path
        return {
            "compute_scale": p.compute_scale,
            "step_overhead": p.step_overhead,
            "decode_scale": p.decode_scale,
            "lone": self.lone,
            "contention": self.contention,
            "decode_seq_time": p.decode_seq_time,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """A calibration as `to_dict` (or an earlier run, with fewer readings) wrote it."""
        readings = {k: d[k] for k in ("lone", "contention") if k in d}
        path = ServingPath.from_dict({k: v for k, v in d.items() if k not in readings})
        return cls(path, **readings)


def uncached(ids: tuple[int, ...], i: int) -> tuple[int, ...]:
    """The prompt with its first token changed by `i` (to another id the prompt uses, so a
    valid one), so that a pick sent again (the warm-up is the median, which a rep may pick
    too) is not a prefix-cache hit: calibration times whole prefills. Same length."""
    if i == 0 or not ids:
        return ids
    return ((ids[0] + i) % (max(ids) + 1), *ids[1:])


async def calibrate(
    url: str,
    model: str,
    profile: Profile,
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
        ids = uncached(req.prompt_token_ids, i)
        alone = Workload(
            (
                dataclasses.replace(
                    req, index=0, arrival=0.0, prompt_token_ids=ids, output_len=output_len
                ),
            ),
            {},
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
    lone = ServingPath(
        step_overhead=max(0.0, overhead), compute_scale=scale, decode_scale=decode_scale
    )
    if trace is None or load is None:
        return Calibration(lone)
    start = os.path.getsize(trace)
    results, _ = await run_workload(url, load, model, progress=False)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration requests failed: {failed[0]}")
    lines = trace_lines_since(trace, start)
    fit = trace_fit(lines, profile)
    seq = fit.path.decode_seq_time if fit else 0.0
    loaded_prefill, loaded_decode = trace_time_ratios(lines, profile, seq)
    loaded = dataclasses.replace(
        lone,
        compute_scale=loaded_prefill or scale,
        decode_scale=loaded_decode or decode_scale,
        decode_seq_time=seq,
        # measured between back-to-back steps, not left over from lone TPOTs after the
        # modelled step (which took in the lone requests' own speed: 9.3 ms against the
        # trace's 5.6 ms on the Xeon's colocated server)
        step_overhead=fit.path.step_overhead if fit else lone.step_overhead,
    )
    return Calibration(
        loaded,
        lone=(scale, decode_scale),
        contention=contention_ratios(lines, profile, decode_seq_time=seq),
    )
