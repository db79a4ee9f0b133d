"""Does the planner's advice hold when deployed? Plan SmolLM2 on this machine's 2 cores,
deploy each layout the plan compares with `serve --plan`, and measure its goodput.

    python benchmarks/plan_vs_real.py [--profile PROFILE.json] [--num-requests N]

1. A 1-core profile of SmolLM2 (made now with `distserve profile`'s code if missing); the
   serving path's per-step overhead (lone requests) and the model's slowdown when served
   (a run of other requests at half the one-core prefill capacity, from the step trace)
   calibrated on a real 1P1D server for the disaggregated search, on a real server of
   2 colocated instances for the colocated baseline and on one with chunked prefill for
   the chunked baseline.
2. `distserve plan`'s search for 2 cores (chatbot, prompts <= 512, outputs <= 64 tokens;
   TTFT target 2.5x a lone median prefill, TPOT 3x a lone decode step, as in
   sim_fidelity.py), made for the same 60 requests that each rate then replays; the plan
   written to benchmarks/results/plan-cpu.json.
3. Each layout the plan scored (disaggregated, colocated, chunked) deployed with
   `serve --plan` and measured at rates stepped from its predicted goodput until attainment
   crosses 90% (then once more inside the bracket); measured goodput is
   interpolated where attainment crosses 90%, as `distserve goodput` does. Next to it: the
   simulated attainment at each measured rate (where attainment is flat in rate, a point
   of attainment moves goodput far), the goodput re-predicted with the same
   calibration repeated on the deployed server just before measuring, and the replay:
   each rate simulated again at the speed its own step trace shows (`trace_fit`), and
   the goodput re-predicted at the speed of the whole measurement (this VM's speed
   drifts by up to 2x within an hour; the replay separates the simulator's error from
   the machine's). The measured goodput comes with a 90% bootstrap interval of its
   requests' own sampling noise (`bench.metrics.goodput_interval`).
Writes benchmarks/results/plan_vs_real.json. `--reanalyse OUT` scores a saved run again
with this code (fits from the saved traces; no server).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

from distserve.bench.calibrate import (
    Calibration,
    TraceFit,
    calibrate,
    gzip_file,
    remove_trace,
    span_end,
    trace_fit,
    trace_lines_since,
    trace_span,
)
from distserve.bench.client import run_workload, server_model
from distserve.bench.metrics import goodput, goodput_interval, met_both, summarize
from distserve.bench.results import read_results, write_results
from distserve.bench.run import tokenizer_for
from distserve.bench.server_process import running_server
from distserve.core import SchedulerConfig
from distserve.planner.phases import Setting
from distserve.planner.plan import (
    attainment_curve,
    choice_from_dict,
    make_plan,
    read_plan,
    verify,
    write_plan,
)
from distserve.planner.profile import profile_path_for_this_cpu
from distserve.planner.search import Cluster
from distserve.sim.profile import load_profiles
from distserve.workload.build import WorkloadSpec, build_workload

KV_GB = 0.3
SCHED = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=2048)
CALIBRATION_SERVERS = {
    "disagg": ["--mode", "disagg"],
    "colocated": ["--mode", "colocated", "--instances", "2"],
    "chunked": ["--mode", "colocated", "--instances", "2", "--chunked-prefill"],
}
STEP = 1.25
"""Rates go up or down by this factor from the predicted goodput until attainment crosses
the target; one more rate then halves the bracket."""


def _profile(path: str):  # type: ignore[no-untyped-def]
    from distserve.config import EngineConfig
    from distserve.core import CacheConfig
    from distserve.planner.profile import profile_model, require_this_cpu
    from distserve.sim.profile import save_profiles

    if os.path.exists(path):
        prof = load_profiles(path)[0]
        require_this_cpu(prof, path)
        return prof

    config = EngineConfig(
        cache=CacheConfig(kv_cache_gb=KV_GB), scheduler=SchedulerConfig(max_num_batched_tokens=4096)
    )
    prof = profile_model(config, cores=1)
    save_profiles(path, [prof])
    return prof


def layout_plan(plan: dict, name: str) -> dict:
    """The plan with `name`'s layout as the one to deploy."""
    choice = plan["disagg"] if name == "disagg" else plan["baselines"][name]
    return plan | {"placement": choice, "recommended": name}


async def measure(
    url: str,
    base: WorkloadSpec,
    tok: Any,
    predicted: float,
    slo: dict,
    trace: str,
    profile: Any,
    details: str,
) -> tuple[list, list, list]:
    """(rate, attainment) points from the predicted goodput: step by STEP towards the
    crossing of 90% until it is bracketed (at most 5 rates), then bisect the bracket once
    (geometrically). With each point, the fit of its own step trace (`trace_fit`): the
    machine's speed while it ran, and the byte span of the trace it read; each rate's
    per-request results go to `details` + '-<rate>-real.json'."""
    model = await server_model(url)
    points: list[tuple[float, float]] = []
    fits: list[TraceFit | None] = []
    spans: list[list[int]] = []

    async def at(rate: float) -> float:
        wl = build_workload(dataclasses.replace(base, rate=rate), tok)
        start = os.path.getsize(trace)
        results, elapsed = await run_workload(url, wl, model, progress=False)
        lines = trace_lines_since(trace, start)
        fit = trace_fit(lines, profile)
        s = summarize(results, slo["ttft"], slo["tpot"], elapsed)
        write_results(f"{details}-{rate:.3f}-real.json", {"rate": rate, "slo": slo}, s, results)
        att = s["attainment"]["both"]
        points.append((rate, att))
        fits.append(fit)
        spans.append([start, span_end(start, lines)])
        speed = (
            f"; speed vs profile: prefill {fit.prefill_scale or 0:.2f}x, decode "
            f"{fit.decode_scale or 0:.2f}x"
            if fit
            else ""
        )
        print(
            f"    rate {rate:6.3f}: attainment {100 * att:5.1f}% "
            f"(p90 TTFT {s['ttft']['p90']:.2f} s, TPOT {1000 * s['tpot']['p90']:.0f} ms{speed})",
            flush=True,
        )
        return att

    rate = round(predicted, 3)
    first = await at(rate) >= 0.9
    for _ in range(4):
        rate = round(rate * STEP if first else rate / STEP, 3)
        if (await at(rate) >= 0.9) != first:
            break
    else:
        return points, fits, spans  # no crossing within the range: goodput is a bound
    lo, hi = sorted(points[-2:])
    await at(round((lo[0] * hi[0]) ** 0.5, 3))
    return points, fits, spans


def _setting(probe, slo: dict, cal: Calibration | TraceFit, n: int) -> Setting:  # type: ignore[no-untyped-def]
    """The planner's setting with a calibration's scales, or with one run's trace fit."""
    if isinstance(cal, Calibration):
        path = {"step_overhead": cal.step_overhead, **cal.scales()}
    else:
        path = cal.sim_options()
    return Setting(
        probe,
        slo["ttft"],
        slo["tpot"],
        0.9,
        SCHED,
        transfer_bandwidth=2.5e9,
        **path,
        min_requests=n,
    )


async def _calibrate(url: str, trace: str, profile, probe, load, label: str) -> Calibration:  # type: ignore[no-untyped-def]
    cal = await calibrate(url, await server_model(url), profile, probe, trace=trace, load=load)
    print(
        f"  {label}: compute scale {cal.compute_scale:.3f} (decode {cal.decode_scale or 0:.3f};"
        f" lone requests {cal.lone}; other instance idle/busy {cal.contention}), step "
        f"overhead {1000 * cal.step_overhead:.1f} ms, per decode request beyond the first "
        f"{1000 * cal.decode_seq_time:.2f} ms",
        flush=True,
    )
    return cal


async def run(args: argparse.Namespace) -> dict:
    if args.profile is None:
        args.profile = profile_path_for_this_cpu("benchmarks/results", "smollm2-1core")
    profile = _profile(args.profile)
    tok = tokenizer_for("smollm2-135m")
    base = WorkloadSpec(
        dataset="chatbot",
        num_requests=args.num_requests,
        seed=args.seed,
        max_prompt_len=512,
        max_output_len=64,
    )
    probe = build_workload(base, tok)
    median_prompt = int(probe.summary()["prompt_median"])
    slo = {
        "ttft": 2.5 * profile.prefill_time([median_prompt]),
        "tpot": 3.0 * profile.decode_time([median_prompt]),
    }
    print(f"SLO TTFT {slo['ttft']:.2f} s, TPOT {1000 * slo['tpot']:.0f} ms", flush=True)
    # calibration under load: other requests (another seed) at half the prefill capacity;
    # it measures speeds (thousands of steps), not attainment, so it need not be as long
    load = build_workload(
        dataclasses.replace(
            base,
            seed=args.seed + 1,
            num_requests=args.calibration_requests,
            rate=round(0.5 / profile.prefill_time([median_prompt]), 3),
        ),
        tok,
    )
    # Each mode's serving path calibrated on a server of that mode: a 1P1D server's scales
    # predicted the colocated layout 38% low (its frontend streams from one decode
    # instance; two colocated instances share the cores with it differently).
    cals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flags in CALIBRATION_SERVERS.items():
            trace = os.path.join(tmp, f"{mode}-steps.jsonl")
            with running_server(*flags, "--trace-steps", trace, kv_cache_gb=KV_GB) as url:
                cals[mode] = await _calibrate(url, trace, profile, probe, load, f"{mode} server")
    settings = {m: _setting(probe, slo, c, args.num_requests) for m, c in cals.items()}
    # The plan is made for the very requests each rate replays (same seed, arrivals
    # stretched): at 60 requests a sample's mix is its own (this one has 8% outputs of <= 4
    # tokens, the first 4,000 requests 4.7%), and a plan for another sample of the same
    # dataset measured the sample difference along with the planner's error.
    t0 = time.perf_counter()
    plan = make_plan(
        settings["disagg"],
        [profile],
        None,
        Cluster(1, 2, "cpu-core"),
        workers=2,
        progress=lambda m: print("  plan: " + m, flush=True),
        workload_meta=probe.meta,
        baseline_setting=settings["colocated"],
        chunked_setting=settings["chunked"],
    )
    print(f"plan in {time.perf_counter() - t0:.0f} s: recommended {plan['recommended']}")
    write_plan(args.plan_output, plan)
    rows: dict = {}
    report = {
        "profile": args.profile,
        "slo": slo,
        "workload_spec": dataclasses.asdict(base),
        "calibration_requests": args.calibration_requests,
        "calibration": {m: dataclasses.asdict(c) for m, c in cals.items()},
        "recommended": plan["recommended"],
        "plan": args.plan_output,
        "layouts": rows,
    }
    names = ["disagg", *plan["baselines"]] if args.all else [plan["recommended"]]
    if args.layouts:
        names = [n for n in names if n in args.layouts.split(",")]
    for name in names:
        d = plan["disagg"] if name == "disagg" else plan["baselines"].get(name)
        if not d or not d.get("goodput"):
            continue
        choice = choice_from_dict(d, [profile])
        setting = settings[name]
        predicted, devices = d["goodput"], d["devices"]
        print(f"  {name}: predicted {predicted:.3f} req/s on {devices} cores", flush=True)
        os.makedirs(args.details_dir, exist_ok=True)
        details = os.path.join(args.details_dir, name)
        trace = f"{details}-steps.jsonl"
        remove_trace(trace)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "plan.json")
            write_plan(path, layout_plan(plan, name))
            with running_server("--plan", path, "--trace-steps", trace, kv_cache_gb=KV_GB) as url:
                # the same calibration again on the deployed server, just before measuring:
                # how far the machine's speed moved since the plan was made
                dcal = await _calibrate(url, trace, profile, probe, load, f"{name} deployed")
                start = os.path.getsize(trace)
                points, fits, spans = await measure(
                    url, base, tok, predicted, slo, trace, profile, details
                )
                whole = trace_fit(trace_lines_since(trace, start), profile)
        gzip_file(trace)
        # simulations after the server stopped: no CPU taken from the measurement
        rows[name] = score(
            Measured(predicted, devices, points, fits, spans, whole, dcal),
            choice,
            setting,
            probe,
            slo,
            details,
        )
        save(args.output, report)  # after every layout: a long run keeps what it measured
    return report


@dataclasses.dataclass
class Measured:
    """What one deployed layout's measurement saw, before any simulation."""

    predicted: float
    devices: int
    points: list
    fits: list
    spans: list
    whole: TraceFit | None
    """The fit of the whole measurement's trace."""
    deployed: Calibration


def score(m: Measured, choice, setting: Setting, probe, slo: dict, details: str) -> dict:  # type: ignore[no-untyped-def]
    """A layout's row: measured goodput (with its interval) against the plan's, the
    re-prediction from the deployed server's calibration, and the replays."""
    rates = [r for r, _ in m.points]
    n = setting.min_requests
    dsetting = _setting(probe, slo, m.deployed, n)
    redo = verify(dsetting, choice)
    measured = goodput(m.points, 0.9)
    interval = measured_interval(details, m.points, slo)
    # Replays: each point simulated at the speed its own trace shows, and the goodput
    # re-predicted at the speed of the whole measurement: what the plan would have said
    # had it known how fast the machine would run (it drifts up to ~2x within an hour).
    replayed = [
        attainment_curve(_setting(probe, slo, f, n), choice, [r])[0] if f else None
        for r, f in zip(rates, m.fits, strict=True)
    ]
    replay_rps = verify(_setting(probe, slo, m.whole, n), choice) if m.whole else None
    sim = attainment_curve(setting, choice, rates)

    def error(x: float | None) -> float | None:
        return (x - measured) / measured if measured and x else None

    row = {
        "predicted_rps": m.predicted,
        "measured_rps": measured,
        "devices": m.devices,
        "predicted_per_core": m.predicted / m.devices,
        "measured_per_core": measured / m.devices,
        "measured_interval": interval,
        "error": error(m.predicted),
        "crossed": any(a >= 0.9 for _, a in m.points) and any(a < 0.9 for _, a in m.points),
        "points": m.points,
        "simulated_attainment": sim,
        "deployed_calibration": dataclasses.asdict(m.deployed),
        "repredicted_rps": redo,
        "repredicted_error": error(redo),
        "simulated_attainment_repredicted": attainment_curve(dsetting, choice, rates),
        "trace_fits": [dataclasses.asdict(f) if f else None for f in m.fits],
        "trace_spans": m.spans,
        "simulated_attainment_replayed": replayed,
        "measurement_fit": dataclasses.asdict(m.whole) if m.whole else None,
        "replayed_rps": replay_rps,
        "replayed_error": error(replay_rps),
    }
    worst = max(100 * abs(a - b) for (_, a), b in zip(m.points, sim, strict=True))
    d = m.devices
    # a draw that misses at the lowest rate measured has no crossing above 0 to give
    low = f"{interval[0] / d:.3f}" if interval[0] > 0 else f"<{min(rates) / d:.3f}"
    print(
        f"  {os.path.basename(details)}: predicted {m.predicted / d:.3f} req/s per core, "
        f"measured {measured / d:.3f} ({100 * (row['error'] or 0):+.1f}%; 90% interval "
        f"{low}-{interval[1] / d:.3f}); attainment real vs simulated at the "
        f"measured rates within {worst:.1f} points; re-predicted with the deployed server's "
        f"calibration {redo / d:.3f}, at the measurement's own speed {(replay_rps or 0) / d:.3f}",
        flush=True,
    )
    return row


def reanalyse(args: argparse.Namespace) -> dict:
    """Score a saved run again with this code (no server): each layout's measurement, the
    calibrations and the plan read back from --output, the plan file and --details-dir."""
    with open(args.output) as f:
        report = json.load(f)
    profile = load_profiles(report["profile"])[0]
    base = WorkloadSpec(**report["workload_spec"])
    probe = build_workload(base, tokenizer_for("smollm2-135m"))
    slo, plan = report["slo"], read_plan(report["plan"])
    cals = {m: Calibration(**c) for m, c in report["calibration"].items()}
    for name, row in report["layouts"].items():
        d = plan["disagg"] if name == "disagg" else plan["baselines"][name]
        own = name if name in cals else "colocated"  # runs before chunked had its own
        fits = [TraceFit(**f) if f else None for f in row["trace_fits"]]
        whole = TraceFit(**row["measurement_fit"]) if row.get("measurement_fit") else None
        details = os.path.join(args.details_dir, name)
        trace, spans = f"{details}-steps.jsonl", row.get("trace_spans") or []
        if spans and (os.path.exists(trace) or os.path.exists(trace + ".gz")):
            # this code's fits, from the saved trace
            fits = [trace_fit(trace_span(trace, s, e), profile) for s, e in spans]
            whole = trace_fit(trace_span(trace, spans[0][0], spans[-1][1]), profile)
        m = Measured(
            row["predicted_rps"],
            row["devices"],
            [tuple(p) for p in row["points"]],
            fits,
            spans,
            whole,
            Calibration(**row["deployed_calibration"]),
        )
        setting = _setting(probe, slo, cals[own], base.num_requests)
        report["layouts"][name] = score(
            m, choice_from_dict(d, [profile]), setting, probe, slo, details
        )
    report["reanalysed"] = True
    return report


def measured_interval(details: str, points: list, slo: dict) -> tuple[float, float]:
    """The measured goodput's bootstrap interval (`goodput_interval`) from each rate's
    per-request results (written by `measure`)."""
    runs = []
    for rate, _ in points:
        _, _, results = read_results(f"{details}-{rate:.3f}-real.json")
        runs.append((rate, met_both(results, slo["ttft"], slo["tpot"])))
    return goodput_interval(runs, 0.9)


def save(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="1-core profile JSON of this CPU, made if missing (default: "
        "benchmarks/results/smollm2-1core-<cpu>.json)",
    )
    ap.add_argument("--num-requests", type=int, default=60, help="requests per rate")
    ap.add_argument(
        "--calibration-requests",
        type=int,
        default=60,
        help="requests of each calibration's loaded run (default 60)",
    )
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument(
        "--recommended-only",
        dest="all",
        action="store_false",
        help="deploy only the recommended layout (default: every layout the plan scored)",
    )
    ap.add_argument(
        "--layouts",
        default=None,
        help="comma-separated layouts to deploy among disagg, colocated, chunked (default: all)",
    )
    ap.add_argument(
        "--plan-output", default="benchmarks/results/plan-cpu.json", help="where the plan goes"
    )
    ap.add_argument(
        "--details-dir",
        default="benchmarks/results/plan_vs_real",
        help="each deployed layout's step trace (gzipped) and per-request results per rate",
    )
    ap.add_argument("--output", default="benchmarks/results/plan_vs_real.json", help="results")
    ap.add_argument(
        "--reanalyse",
        metavar="OUT",
        default=None,
        help="score the run saved in --output and --details-dir again with this code (no "
        "server: intervals, re-predictions, replays); write it to OUT",
    )
    args = ap.parse_args()
    if args.reanalyse:
        save(args.reanalyse, reanalyse(args))
    else:
        save(args.output, asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
