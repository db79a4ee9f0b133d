"""Simulator fidelity: the real server and the simulator on the same requests.

    python benchmarks/sim_fidelity.py [--quick] [--profile PROFILE.json]

1. Profile SmolLM2 on one core (each instance of both placements owns one core), unless a
   profile file is given; calibrate through the real server and its step trace: the
   per-step overhead outside the model (Ray round trip, streaming) from lone requests, and
   how much slower the model's prefill and decode steps run when serving (the API server
   and the load generator share the two cores; a decode step starts with cold caches)
   from a run of other requests (another seed) at half the one-core prefill capacity.
2. For disagg 1P1D and colocated 2x1, at rates from low load to past saturation, replay the
   same chatbot requests against the real server and through the simulator.
3. Report attainment real vs simulated per rate (the paper's Table 2 shape) and the error
   of median TTFT and TPOT; and the same for the replay: each rate simulated again with
   the scales and step overhead fitted to its own step trace (`trace_fit`), which
   separates the simulator's error from the drift of this VM's speed between the
   calibration and the run; with it, the band (p10-p90) of the replay's attainment when
   each step's time is drawn around the fit as the run's steps spread around it: how
   far that step-to-step variation alone moves attainment at 60 requests.
   Writes benchmarks/results/sim_fidelity.json; the raw detail (per-request results, step
   traces) goes to --details-dir, outside the tree by default (`distserve.bench.runs`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys

from distserve.bench.calibrate import Calibration, calibrate
from distserve.bench.client import run_workload, server_model
from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SchedulerConfig
from distserve.metrics.results import read_results, write_results
from distserve.metrics.slo import attainment
from distserve.metrics.summary import percentile
from distserve.model.metadata import tokenizer_for
from distserve.sim.profile import load_profiles, save_profiles
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import Simulator
from distserve.sim.trace_files import (
    gzip_file,
    remove_trace,
    span_end,
    trace_lines_since,
    trace_spans,
)
from distserve.sim.trace_fit import TraceFit, trace_fit
from distserve.workload.build import WorkloadSpec, build_workload

KV_GB = 0.3
SYSTEMS = {
    "disagg-1P1D": ("disagg", ["--mode", "disagg"]),
    "colocated-2x1": ("colocated", ["--mode", "colocated", "--instances", "2"]),
}
SCHED = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=2048)
REPLAY_DRAWS = 20


def get_profile(path: str | None, quick: bool) -> tuple[object, str]:
    from distserve.planner.profile import (
        profile_model,
        profile_path_for_this_cpu,
        require_this_cpu,
    )

    if path and os.path.exists(path):
        prof = load_profiles(path)[0]
        require_this_cpu(prof, path)
        return prof, path

    out = path or profile_path_for_this_cpu("benchmarks/results", "smollm2-1core")
    if os.path.exists(out):
        prof = load_profiles(out)[0]
        require_this_cpu(prof, out)
        return prof, out
    config = EngineConfig(
        cache=CacheConfig(kv_cache_gb=KV_GB), scheduler=SchedulerConfig(max_num_batched_tokens=4096)
    )
    prof = profile_model(config, cores=1, quick=quick)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_profiles(out, [prof])
    return prof, out


def compare(real, simulated, slo, replayed=None) -> dict:  # type: ignore[no-untyped-def]
    """Real against simulated (the calibration made before the runs) and, where given,
    against replayed (the run's own trace fit: the machine's speed during that run)."""
    out = {}
    runs = (("real", real), ("sim", simulated), ("replay", replayed))
    for name, res in ((n, r) for n, r in runs if r is not None):
        ok = [r for r in res if r.ok]
        out[name] = {
            "attainment": attainment(res, slo["ttft"], slo["tpot"]),
            "ttft_p50": percentile([r.ttft for r in ok], 50),
            "tpot_p50": percentile([r.tpot for r in ok], 50),
        }
    r = out["real"]
    for name, prefix in (("sim", ""), ("replay", "replay_")):
        if name not in out:
            continue
        s = out[name]
        out[f"{prefix}attainment_error_points"] = 100 * abs(
            r["attainment"]["both"] - s["attainment"]["both"]
        )
        out[f"{prefix}ttft_p50_rel_error"] = abs(s["ttft_p50"] - r["ttft_p50"]) / r["ttft_p50"]
        out[f"{prefix}tpot_p50_rel_error"] = abs(s["tpot_p50"] - r["tpot_p50"]) / r["tpot_p50"]
    return out


def base_spec(args: argparse.Namespace) -> WorkloadSpec:
    n = 20 if args.quick else args.num_requests
    return WorkloadSpec(
        dataset="chatbot", num_requests=n, seed=args.seed, max_prompt_len=512, max_output_len=64
    )


async def run(args: argparse.Namespace) -> dict:
    profile, profile_path = get_profile(args.profile, args.quick)
    tok = tokenizer_for("smollm2-135m")
    base = base_spec(args)
    probe = build_workload(base, tok)
    single_prefill = profile.prefill_time([int(probe.summary()["prompt_median"])])
    single_decode = profile.decode_time([int(probe.summary()["prompt_median"])])
    # TPOT target 3x the model's lone step: the serving path adds ~6 ms a token to an
    # ~11 ms step here, so 2x (22 ms) sat inside the real server's run-to-run spread of
    # TPOT and attainment flipped between two runs of the same system.
    slo = {"ttft": 2.5 * single_prefill, "tpot": 3.0 * single_decode}
    prefill_rate = 1.0 / single_prefill
    # from low load to past saturation of both placements (1P1D saturates near 1x the
    # one-core prefill rate, 2 colocated instances later)
    factors = (0.2, 0.6) if args.quick else (0.2, 0.45, 0.7, 0.95, 1.2, 1.5)
    rates = [round(prefill_rate * f, 3) for f in factors]
    # calibration under load: other requests (another seed) at half the prefill capacity
    load = build_workload(
        dataclasses.replace(base, seed=args.seed + 1, rate=round(0.5 * prefill_rate, 3)), tok
    )
    report: dict = {
        "profile": profile_path,
        "slo": slo,
        "rates": rates,
        "lengths": probe.summary(),
        "systems": {},
    }
    print(f"SLO TTFT {slo['ttft']:.2f} s, TPOT {slo['tpot']:.3f} s; rates {rates}", flush=True)
    for system in args.systems.split(","):
        mode, flags = SYSTEMS[system]
        rows = []
        os.makedirs(args.details_dir, exist_ok=True)
        trace = os.path.join(args.details_dir, f"{system}-steps.jsonl")
        remove_trace(trace)
        with running_server(*flags, "--trace-steps", trace, kv_cache_gb=KV_GB) as url:
            model = await server_model(url)
            cal = await calibrate(url, model, profile, probe, trace=trace, load=load)
            p = cal.path
            print(
                f"{system}: compute scale {p.compute_scale:.3f} (decode "
                f"{p.decode_scale or 0:.3f}; lone requests {cal.lone}; other instances "
                f"idle/busy {cal.contention}), step overhead {1000 * p.step_overhead:.1f} ms",
                flush=True,
            )
            config = simulated_system(mode, profile, cal.serving_path(not args.no_contention))
            for rate in rates:
                wl = build_workload(dataclasses.replace(base, rate=rate), tok)
                start = os.path.getsize(trace)
                real, _ = await run_workload(url, wl, model, progress=False)
                lines = trace_lines_since(trace, start)
                fit = trace_fit(lines, profile)
                sim = Simulator(config).run(wl)
                replay = replayed(mode, profile, fit, wl)
                row = {"rate": rate, **compare(real, sim, slo, replay)}
                with_band(row, replay_band(mode, profile, fit, wl, slo))
                row["fit"] = fit.to_dict() if fit else None
                row["trace_span"] = [start, span_end(start, lines)]  # --resimulate refits
                for kind, res in (("real", real), ("sim", sim), ("replay", replay)):
                    if res is None:
                        continue
                    # per request, to diagnose
                    write_results(
                        os.path.join(args.details_dir, f"{system}-{rate:.3f}-{kind}.json"),
                        {"system": system, "rate": rate, "slo": slo, "kind": kind},
                        row[kind],
                        res,
                    )
                rows.append(row)
                print_row(system, row)
        gzip_file(trace)
        report["systems"][system] = {"calibration": cal.to_dict(), "rows": rows}
    return report


def simulated_system(mode: str, profile, path: ServingPath):  # type: ignore[no-untyped-def]
    """The simulated system with a serving path: a calibration's
    (`Calibration.serving_path`), or one run's trace fit (`TraceFit.path`)."""
    path = dataclasses.replace(path, transfer_bandwidth=2.5e9, transfer_overhead=0.005)
    opts = SimOptions(path, scheduler=SCHED)
    return sim_config(PlacementConfig(mode=mode, num_instances=2), profile, None, opts)


def replayed(mode: str, profile, fit: TraceFit | None, wl):  # type: ignore[no-untyped-def]
    """The requests simulated at the speed one run's trace shows (None without a fit)."""
    return Simulator(simulated_system(mode, profile, fit.path)).run(wl) if fit else None


def replay_band(mode: str, profile, fit: TraceFit | None, wl, slo: dict) -> list | None:  # type: ignore[no-untyped-def]
    """p10 / p50 / p90 of the replay's attainment with each step's time drawn around the
    fit, as the run's own steps spread around it (`TraceFit.noise`), over REPLAY_DRAWS
    seeds: how far the machine's step-to-step variation alone moves attainment."""
    if fit is None or not fit.noise:
        return None
    base = simulated_system(mode, profile, fit.path)
    runs = [
        Simulator(dataclasses.replace(base, step_noise=fit.noise, seed=i)).run(wl)
        for i in range(REPLAY_DRAWS)
    ]
    both = [attainment(r, slo["ttft"], slo["tpot"])["both"] for r in runs]
    return [percentile(both, q) for q in (10, 50, 90)]


def with_band(row: dict, band: list | None) -> dict:
    row["replay_band"] = band
    if band:
        real = row["real"]["attainment"]["both"]
        row["real_in_replay_band"] = band[0] - 1e-9 <= real <= band[2] + 1e-9
    return row


def print_row(system: str, row: dict) -> None:
    re, si, rp = row["real"], row["sim"], row.get("replay")
    band = row.get("replay_band")
    replay = (
        f" replay {100 * rp['attainment']['both']:5.1f}% (speed prefill "
        f"{row['fit']['prefill_scale'] or 0:.2f} decode {row['fit']['decode_scale'] or 0:.2f}"
        + (f"; noisy p10-p90 {100 * band[0]:.1f}-{100 * band[2]:.1f}%" if band else "")
        + ")"
        if rp
        else ""
    )
    print(
        f"{system:14s} rate {row['rate']:6.3f}: attainment real "
        f"{100 * re['attainment']['both']:5.1f}% "
        f"sim {100 * si['attainment']['both']:5.1f}%{replay}"
        f"  TTFT p50 {re['ttft_p50']:.2f}/{si['ttft_p50']:.2f}s"
        f"  TPOT p50 {1000 * re['tpot_p50']:.0f}/{1000 * si['tpot_p50']:.0f}ms",
        flush=True,
    )


def resimulate(args: argparse.Namespace) -> dict:
    """The simulator alone, against the real results and calibrations a run saved (e.g.
    with and without contention): no server, seconds instead of minutes."""
    with open(args.output) as f:
        report = json.load(f)
    profile = load_profiles(report["profile"])[0]
    tok = tokenizer_for("smollm2-135m")
    base = base_spec(args)
    slo = report["slo"]
    for system, saved in report["systems"].items():
        mode = SYSTEMS[system][0]
        cal = Calibration.from_dict(saved["calibration"])
        config = simulated_system(mode, profile, cal.serving_path(not args.no_contention))
        rows = []
        for rate in report["rates"]:
            wl = build_workload(dataclasses.replace(base, rate=rate), tok)
            path = os.path.join(args.details_dir, f"{system}-{rate:.3f}-real.json")
            real = read_results(path)[2]
            old = next((r for r in saved["rows"] if r["rate"] == rate), {})
            fit = TraceFit.from_dict(old["fit"]) if old.get("fit") else None
            trace = os.path.join(args.details_dir, f"{system}-steps.jsonl")
            if old.get("trace_span") and (os.path.exists(trace) or os.path.exists(trace + ".gz")):
                (lines,) = trace_spans(trace, [old["trace_span"]])
                fit = trace_fit(lines, profile)  # this code's fit
            replay = replayed(mode, profile, fit, wl)
            row = {"rate": rate, **compare(real, Simulator(config).run(wl), slo, replay)}
            with_band(row, replay_band(mode, profile, fit, wl, slo))
            row["fit"] = fit.to_dict() if fit else None
            row["trace_span"] = old.get("trace_span")
            rows.append(row)
            print_row(system, row)
        saved["rows"] = rows
    report["resimulated"] = {"contention": not args.no_contention}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="profile JSON of this CPU to use (or to write, if missing); default: "
        "benchmarks/results/smollm2-1core-<cpu>.json",
    )
    ap.add_argument("--num-requests", type=int, default=60, help="requests per rate (default: 60)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to run among {', '.join(SYSTEMS)} (default: both)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument(
        "--resimulate",
        metavar="OUT",
        default=None,
        help="rerun only the simulator against the real results and calibrations saved in "
        "--output and --details-dir; write the rows to OUT",
    )
    ap.add_argument(
        "--no-contention",
        action="store_true",
        help="simulate without the contention between busy instances the calibration reads",
    )
    ap.add_argument(
        "--details-dir",
        default=None,
        help="per-request results of each run, real and simulated, and the servers' step "
        "traces (default: $DISTSERVE_RUNS_DIR or ~/.cache/distserve/runs, in a directory "
        "named after --output)",
    )
    ap.add_argument("--output", default="benchmarks/results/sim_fidelity.json", help="results JSON")
    args = ap.parse_args()
    args.details_dir = args.details_dir or details_dir_for(args.output)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        names = ", ".join(SYSTEMS)
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))}; choose among {names}")
    report = resimulate(args) if args.resimulate else asyncio.run(run(args))
    errs = [r["attainment_error_points"] for s in report["systems"].values() for r in s["rows"]]
    ttft = [r["ttft_p50_rel_error"] for s in report["systems"].values() for r in s["rows"]]
    tpot = [r["tpot_p50_rel_error"] for s in report["systems"].values() for r in s["rows"]]
    report["worst_attainment_error_points"] = max(errs)
    report["median_ttft_rel_error"] = statistics.median(ttft)
    report["median_tpot_rel_error"] = statistics.median(tpot)
    keys = ["worst_attainment_error_points", "median_ttft_rel_error", "median_tpot_rel_error"]
    rows = [r for s in report["systems"].values() for r in s["rows"] if "replay" in r]
    if rows:
        report["replay_worst_attainment_error_points"] = max(
            r["replay_attainment_error_points"] for r in rows
        )
        for k in ("ttft", "tpot"):
            report[f"replay_median_{k}_rel_error"] = statistics.median(
                r[f"replay_{k}_p50_rel_error"] for r in rows
            )
        keys += [f"replay_{k}" for k in keys]
        banded = [r for r in rows if r.get("replay_band")]
        if banded:
            report["real_in_replay_band"] = (
                f"{sum(r['real_in_replay_band'] for r in banded)}/{len(banded)}"
            )
            keys.append("real_in_replay_band")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    out = args.resimulate or args.output
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
