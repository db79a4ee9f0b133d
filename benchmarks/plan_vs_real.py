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
   requests' own sampling noise (`metrics.goodput.goodput_interval`). With --interleave the
   layouts are measured rate by rate in turns, so that the machine's drift cannot rank
   them.
Writes benchmarks/results/plan_vs_real.json; the raw detail (per-request results, step
traces) goes to --details-dir, outside the tree by default (`distserve.bench.runs`).
`--reanalyse OUT` scores a saved run again with this code (fits from the saved traces; no
server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator

from distserve.bench.calibrate import Calibration, calibrate
from distserve.bench.client import run_workload, server_model
from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.core import SchedulerConfig
from distserve.metrics.goodput import goodput, goodput_interval
from distserve.metrics.results import read_results, write_results
from distserve.metrics.slo import met_both
from distserve.metrics.summary import summarize
from distserve.model.metadata import tokenizer_for
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
from distserve.sim.trace_files import (
    gzip_file,
    remove_trace,
    span_end,
    trace_lines_since,
    trace_spans,
)
from distserve.sim.trace_fit import TraceFit, trace_fit
from distserve.workload.build import WorkloadSpec, build_workload
from distserve.workload.spec import Workload

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
    return plan | {"placement": scored(plan, name), "recommended": name}


def scored(plan: dict, name: str) -> dict:
    """The plan's entry for layout `name` (disagg or one of its baselines); {} if none."""
    return plan["disagg"] if name == "disagg" else plan["baselines"].get(name) or {}


def next_rate(points: list, predicted: float) -> float | None:
    """The next rate to measure given the (rate, attainment) points so far, or None when
    done: the predicted goodput first, then steps of STEP towards the crossing of 90% until
    it is bracketed (at most 4), then the bracket bisected once (geometrically). Without a
    crossing within the range, the goodput is a bound."""
    if not points:
        return round(predicted, 3)
    first = points[0][1] >= 0.9
    flips = [i for i, (_, a) in enumerate(points) if (a >= 0.9) != first]
    if not flips:
        if len(points) >= 5:
            return None
        rate = points[-1][0]
        return round(rate * STEP if first else rate / STEP, 3)
    i = flips[0]
    if len(points) > i + 1:
        return None
    lo, hi = points[i - 1][0], points[i][0]
    return round((lo * hi) ** 0.5, 3)


@dataclasses.dataclass
class Layout:
    """One layout the plan scored, as it is deployed and measured."""

    name: str
    predicted: float
    devices: int
    details: str
    """Path prefix of its step trace and per-rate results."""
    points: list = dataclasses.field(default_factory=list)
    """(rate, attainment) measured so far."""
    fits: list = dataclasses.field(default_factory=list)
    """Each point's own step trace fit (`trace_fit`): the machine's speed while it ran."""
    spans: list = dataclasses.field(default_factory=list)
    """Each point's byte span of the step trace."""
    deployed: Calibration | None = None

    @property
    def trace(self) -> str:
        return f"{self.details}-steps.jsonl"

    def next_rate(self) -> float | None:
        return next_rate(self.points, self.predicted)

    async def at(self, url: str, rate: float, base: WorkloadSpec, tok, slo: dict, profile) -> None:  # type: ignore[no-untyped-def]
        """Measure one rate on the server at `url`; its per-request results go to
        details + '-<rate>-real.json'."""
        wl = build_workload(dataclasses.replace(base, rate=rate), tok)
        start = os.path.getsize(self.trace)
        results, elapsed = await run_workload(url, wl, await server_model(url), progress=False)
        lines = trace_lines_since(self.trace, start)
        fit = trace_fit(lines, profile)
        s = summarize(results, slo["ttft"], slo["tpot"], elapsed)
        meta = {"rate": rate, "slo": slo}
        write_results(f"{self.details}-{rate:.3f}-real.json", meta, s, results)
        att = s["attainment"]["both"]
        self.points.append((rate, att))
        self.fits.append(fit)
        self.spans.append([start, span_end(start, lines)])
        speed = (
            f"; speed vs profile: prefill {fit.prefill_scale or 0:.2f}x, decode "
            f"{fit.path.decode_scale or 0:.2f}x"
            if fit
            else ""
        )
        print(
            f"    {self.name} rate {rate:6.3f}: attainment {100 * att:5.1f}% (p90 TTFT "
            f"{s['ttft']['p90']:.2f} s, TPOT {1000 * s['tpot']['p90']:.0f} ms{speed})",
            flush=True,
        )


async def warm_up(url: str, probe) -> None:  # type: ignore[no-untyped-def]
    """A fresh server's first steps pay first-touch page faults and allocator growth: send
    a few of the probe's requests at once (every instance gets some) before measuring."""
    reqs = tuple(
        dataclasses.replace(r, index=i, arrival=0.0, output_len=16)
        for i, r in enumerate(probe.requests[:6])
    )
    await run_workload(url, Workload(reqs, {}), await server_model(url), progress=False)


def _setting(probe, slo: dict, cal: Calibration | TraceFit, n: int) -> Setting:  # type: ignore[no-untyped-def]
    """The planner's setting with a calibration's serving path, or with one run's trace fit."""
    path = cal.serving_path() if isinstance(cal, Calibration) else cal.path
    return Setting(
        probe,
        slo["ttft"],
        slo["tpot"],
        0.9,
        SCHED,
        path=dataclasses.replace(path, transfer_bandwidth=2.5e9),
        min_requests=n,
    )


async def _calibrate(url: str, trace: str, profile, probe, load, label: str) -> Calibration:  # type: ignore[no-untyped-def]
    cal = await calibrate(url, await server_model(url), profile, probe, trace=trace, load=load)
    p = cal.path
    print(
        f"  {label}: compute scale {p.compute_scale:.3f} (decode {p.decode_scale or 0:.3f};"
        f" lone requests {cal.lone}; other instance idle/busy {cal.contention}), step "
        f"overhead {1000 * p.step_overhead:.1f} ms, per decode request beyond the first "
        f"{1000 * p.decode_seq_time:.2f} ms",
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
        "calibration": {m: c.to_dict() for m, c in cals.items()},
        "recommended": plan["recommended"],
        "plan": args.plan_output,
        "layouts": rows,
    }
    report["interleaved"] = args.interleave
    names = ["disagg", *plan["baselines"]] if args.all else [plan["recommended"]]
    if args.layouts:
        names = [n for n in names if n in args.layouts.split(",")]
    os.makedirs(args.details_dir, exist_ok=True)
    layouts = []
    for name in names:
        d = scored(plan, name)
        if d.get("goodput"):
            details = os.path.join(args.details_dir, name)
            layouts.append(Layout(name, d["goodput"], d["devices"], details))
            remove_trace(layouts[-1].trace)
            print(f"  {name}: predicted {d['goodput']:.3f} req/s on {d['devices']} cores")

    def finish(lay: Layout) -> None:
        gzip_file(lay.trace)
        # simulations after the server stopped: no CPU taken from the measurement
        choice = choice_from_dict(scored(plan, lay.name), [profile])
        # the whole measurement: the rates' spans, without the calibration and warm-ups
        whole = trace_fit(list(itertools.chain(*trace_spans(lay.trace, lay.spans))), profile)
        rows[lay.name] = score(lay, whole, choice, settings[lay.name], probe, slo)
        save(args.output, report)  # after every layout: a long run keeps what it measured

    with tempfile.TemporaryDirectory() as tmp:

        @contextlib.asynccontextmanager
        async def deployed(lay: Layout) -> AsyncIterator[str]:
            path = os.path.join(tmp, f"{lay.name}-plan.json")
            write_plan(path, layout_plan(plan, lay.name))
            flags = ("--plan", path, "--trace-steps", lay.trace)
            with running_server(*flags, kv_cache_gb=KV_GB) as url:
                if lay.deployed is None:
                    # the same calibration again on the deployed server, just before
                    # measuring: how far the machine's speed moved since the plan was made
                    label = f"{lay.name} deployed"
                    lay.deployed = await _calibrate(url, lay.trace, profile, probe, load, label)
                else:
                    await warm_up(url, probe)
                yield url

        if not args.interleave:
            for lay in layouts:
                async with deployed(lay) as url:
                    while (rate := lay.next_rate()) is not None:
                        await lay.at(url, rate, base, tok, slo, profile)
                finish(lay)
            return report
        # Rate by rate in turns, the order reversed every round (ABBA), a fresh server
        # for each rate: the machine's drift over the hour falls on every layout alike.
        for turn in itertools.count():
            todo = [lay for lay in layouts if lay.next_rate() is not None]
            if not todo:
                break
            for lay in todo if turn % 2 == 0 else todo[::-1]:
                rate = lay.next_rate()
                assert rate is not None
                async with deployed(lay) as url:
                    await lay.at(url, rate, base, tok, slo, profile)
        for lay in layouts:
            finish(lay)
    return report


def score(lay: Layout, whole: TraceFit | None, choice, setting: Setting, probe, slo: dict) -> dict:  # type: ignore[no-untyped-def]
    """A layout's row: measured goodput (with its interval) against the plan's, the
    re-prediction from the deployed server's calibration, and the replays (`whole`: the
    fit of the whole measurement's trace)."""
    assert lay.deployed is not None
    rates = [r for r, _ in lay.points]
    n = setting.min_requests
    dsetting = _setting(probe, slo, lay.deployed, n)
    redo = verify(dsetting, choice)
    measured = goodput(lay.points, 0.9)
    interval = measured_interval(lay.details, lay.points, slo)
    # Replays: each point simulated at the speed its own trace shows, and the goodput
    # re-predicted at the speed of the whole measurement: what the plan would have said
    # had it known how fast the machine would run (it drifts up to ~2x within an hour).
    replayed = [
        attainment_curve(_setting(probe, slo, f, n), choice, [r])[0] if f else None
        for r, f in zip(rates, lay.fits, strict=True)
    ]
    replay_rps = verify(_setting(probe, slo, whole, n), choice) if whole else None
    sim = attainment_curve(setting, choice, rates)

    def error(x: float | None) -> float | None:
        return (x - measured) / measured if measured and x else None

    row = {
        "predicted_rps": lay.predicted,
        "measured_rps": measured,
        "devices": lay.devices,
        "predicted_per_core": lay.predicted / lay.devices,
        "measured_per_core": measured / lay.devices,
        "measured_interval": interval,
        "error": error(lay.predicted),
        "crossed": any(a >= 0.9 for _, a in lay.points) and any(a < 0.9 for _, a in lay.points),
        "points": lay.points,
        "simulated_attainment": sim,
        "deployed_calibration": lay.deployed.to_dict(),
        "repredicted_rps": redo,
        "repredicted_error": error(redo),
        "simulated_attainment_repredicted": attainment_curve(dsetting, choice, rates),
        "trace_fits": [f.to_dict() if f else None for f in lay.fits],
        "trace_spans": lay.spans,
        "simulated_attainment_replayed": replayed,
        "measurement_fit": whole.to_dict() if whole else None,
        "replayed_rps": replay_rps,
        "replayed_error": error(replay_rps),
    }
    worst = max(100 * abs(a - b) for (_, a), b in zip(lay.points, sim, strict=True))
    d = lay.devices
    # a draw that misses at the lowest rate measured has no crossing above 0 to give
    low = f"{interval[0] / d:.3f}" if interval[0] > 0 else f"<{min(rates) / d:.3f}"
    print(
        f"  {lay.name}: predicted {lay.predicted / d:.3f} req/s per core, "
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
    cals = {m: Calibration.from_dict(c) for m, c in report["calibration"].items()}
    for name, row in report["layouts"].items():
        d = scored(plan, name)
        own = name if name in cals else "colocated"  # runs before chunked had its own
        lay = Layout(
            name,
            row["predicted_rps"],
            row["devices"],
            os.path.join(args.details_dir, name),
            [tuple(p) for p in row["points"]],
            [TraceFit.from_dict(f) if f else None for f in row["trace_fits"]],
            row.get("trace_spans") or [],
            Calibration.from_dict(row["deployed_calibration"]),
        )
        whole = TraceFit.from_dict(row["measurement_fit"]) if row.get("measurement_fit") else None
        if lay.spans and (os.path.exists(lay.trace) or os.path.exists(lay.trace + ".gz")):
            # this code's fits: each rate's span, and the whole measurement (the rates'
            # spans, without the calibration and warm-ups between)
            parts = trace_spans(lay.trace, lay.spans)
            lay.fits = [trace_fit(p, profile) for p in parts]
            whole = trace_fit(list(itertools.chain(*parts)), profile)
        setting = _setting(probe, slo, cals[own], base.num_requests)
        report["layouts"][name] = score(
            lay, whole, choice_from_dict(d, [profile]), setting, probe, slo
        )
    report["reanalysed"] = True
    return report


def measured_interval(details: str, points: list, slo: dict) -> tuple[float, float]:
    """The measured goodput's bootstrap interval (`goodput_interval`) from each rate's
    per-request results (written by `Layout.at`)."""
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
        "--interleave",
        action="store_true",
        help="measure the layouts rate by rate in turns (order reversed every round), a fresh "
        "warmed-up server for each rate, so the machine's drift falls on every layout alike "
        "(default: one layout after the other, one server each)",
    )
    ap.add_argument(
        "--plan-output", default="benchmarks/results/plan-cpu.json", help="where the plan goes"
    )
    ap.add_argument(
        "--details-dir",
        default=None,
        help="each deployed layout's step trace (gzipped) and per-request results per rate "
        "(default: $DISTSERVE_RUNS_DIR or ~/.cache/distserve/runs, in a directory named "
        "after --output)",
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
    args.details_dir = args.details_dir or details_dir_for(args.output)
    if args.reanalyse:
        save(args.reanalyse, reanalyse(args))
    else:
        save(args.output, asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
