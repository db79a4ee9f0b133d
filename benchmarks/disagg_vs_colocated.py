"""The headline experiment: does disaggregation pay on this machine?

    python benchmarks/disagg_vs_colocated.py [--quick] [--workloads chatbot,code,summarization]

For each workload, SmolLM2 is served three ways on the machine's 2 cores, each instance
owning one core: 1P1D disaggregated, 2 colocated instances (vLLM-style, prefill first),
2 colocated instances with chunked prefill (Sarathi-Serve-style). Each is driven by the same
requests at a series of Poisson rates; per-core goodput (the highest rate with >= 90% of
requests meeting both targets, interpolated, divided by 2 cores) says who wins.

SLOs follow the paper's, scaled to this CPU: each target is the paper's target times the
ratio of this machine's single-request latency to the A100's for the same prompt (from the
bundled DistServe profile, at the paper's parallelism for that model). Attainment is also
recomputed at tightened TTFT and TPOT targets from a fixed-rate run (the paper's Fig. 9).
Results: benchmarks/results/headline/ (summary.json, PNG plots); the per-rate results of
every request go to --details-dir, outside the tree by default (`distserve.bench.runs`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time

from distserve.bench.client import run_workload, server_model
from distserve.bench.plots import attainment_vs_x, phase_cdf
from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.metrics.goodput import goodput
from distserve.metrics.results import RequestResult, read_results, write_results
from distserve.metrics.slo import attainment, min_slo_scale
from distserve.metrics.summary import phase_breakdown, summarize
from distserve.model.metadata import tokenizer_for
from distserve.sim.profile import bundled_a100, find
from distserve.workload.build import WorkloadSpec, build_workload
from distserve.workload.spec import Workload

CORES = 2
# The paper's SLOs (OSDI'24) and the model and parallelism the paper served each with.
PAPER = {
    "chatbot": {"model": "opt-13b", "ttft": 0.25, "tpot": 0.1, "prefill_tp": 2, "decode_tp": 1},
    "code": {"model": "opt-66b", "ttft": 0.125, "tpot": 0.2, "prefill_tp": 4, "decode_tp": 2},
    "summarization": {
        "model": "opt-66b",
        "ttft": 15.0,
        "tpot": 0.15,
        "prefill_tp": 4,
        "decode_tp": 2,
    },
}
# Caps for a 135M model on 2 CPU cores (recorded in every result file).
CAPS = {"chatbot": (1024, 128), "code": (None, 128), "summarization": (None, 128)}
SYSTEMS = {
    "disagg-1P1D": ["--mode", "disagg"],
    "colocated-2x1": ["--mode", "colocated", "--instances", "2"],
    "chunked-2x1": ["--mode", "colocated", "--instances", "2", "--chunked-prefill"],
}
RATE_FACTORS = (0.3, 0.5, 0.7, 0.9, 1.2, 1.5)
"""Rates tried, as multiples of one core's prefill-bound rate (1 / single-request prefill).
A sweep stops early once attainment is far below target past the fixed rate."""
FIXED_FACTOR = 0.7
"""The rate of the SLO-scale curves (the paper's Fig. 9 shape), as a multiple as above."""
STOP_BELOW = 0.5
SCALES = (0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0)
GOODPUT_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""SLO scales at which per-core goodput is also reported (from the same runs)."""


async def single_request_latency(
    url: str, workload: Workload, model: str, reps: int = 3
) -> tuple[float, float]:
    """Prefill seconds and TPOT of the median-length request, sent alone (median of reps)."""
    by_len = sorted(workload.requests, key=lambda r: r.prompt_len)
    med = by_len[len(by_len) // 2]
    alone = Workload(tuple(dataclasses.replace(med, index=i, arrival=0.0) for i in range(1)), {})
    prefills, tpots = [], []
    for _ in range(reps):
        (res,), _ = await run_workload(url, alone, model, progress=False)
        assert res.ok, res.error
        prefills.append(res.server["prefill_end"] - res.server["prefill_start"])
        tpots.append(res.tpot or 0.0)
    return statistics.median(prefills), statistics.median(tpots)


def scaled_slo(name: str, workload: Workload, prefill_s: float, tpot_s: float) -> dict[str, float]:
    paper = PAPER[name]
    lens = workload.summary()
    prompt, out = int(lens["prompt_median"]), int(lens["output_median"])
    profiles = bundled_a100("distserve")
    a100_prefill = find(profiles, paper["model"], paper["prefill_tp"]).prefill_time([prompt])
    a100_tpot = find(profiles, paper["model"], paper["decode_tp"]).decode_time([prompt + out // 2])
    return {
        "ttft": paper["ttft"] * prefill_s / a100_prefill,
        "tpot": paper["tpot"] * tpot_s / a100_tpot,
        "paper_ttft": paper["ttft"], "paper_tpot": paper["tpot"],
        "ours_prefill_s": prefill_s, "ours_tpot_s": tpot_s,
        "a100_prefill_s": a100_prefill, "a100_tpot_s": a100_tpot,
        "median_prompt": prompt, "median_output": out,
    }  # fmt: skip


async def sweep_system(
    url: str,
    workload_at,
    rates: list[float],
    slo: dict[str, float],
    model: str,
    out_dir: str,
    tag: str,
    fixed: float,
) -> dict[str, list]:
    runs: dict[str, list] = {"points": [], "results": [], "rates": []}
    for rate in rates:
        if runs["points"] and runs["points"][-1][1] < STOP_BELOW and rate > fixed:
            print(f"  {tag:28s} rate {rate:6.3f}: skipped (far past saturation)", flush=True)
            continue
        wl = workload_at(rate)
        results, elapsed = await run_workload(url, wl, model, progress=False)
        s = summarize(results, slo["ttft"], slo["tpot"], elapsed)
        write_results(
            os.path.join(out_dir, f"{tag}-rate-{rate:.3f}.json"),
            {"system": tag, "rate": rate, "workload": wl.meta, "slo": slo},
            s,
            results,
        )
        att, a = s["attainment"]["both"], s["attainment"]
        runs["points"].append((rate, att))
        runs["results"].append(results)
        runs["rates"].append(rate)
        print(
            f"  {tag:28s} rate {rate:6.3f}: both {100 * att:5.1f}%  ttft {100 * a['ttft']:5.1f}%"
            f"  tpot {100 * a['tpot']:5.1f}%  (p90 ttft {s['ttft']['p90']:.2f}s,"
            f" tpot {s['tpot']['p90']:.3f}s)",
            flush=True,
        )
    return runs


def scale_curve(
    results: list[RequestResult], slo: dict[str, float], which: str
) -> list[tuple[float, float]]:
    pts = []
    for s in SCALES:
        ttft = slo["ttft"] * (s if which in ("ttft", "both") else 1.0)
        tpot = slo["tpot"] * (s if which in ("tpot", "both") else 1.0)
        pts.append((s, attainment(results, ttft, tpot)["both"]))
    return pts


async def run_workload_experiment(name: str, args: argparse.Namespace, out_dir: str) -> dict:
    tokenizer = tokenizer_for("smollm2-135m")
    max_p, max_o = CAPS[name]
    n = args.num_requests or (16 if args.quick or name == "summarization" else 40)
    base = WorkloadSpec(
        dataset=name,
        num_requests=n,
        rate=1.0,
        seed=args.seed,
        max_prompt_len=max_p,
        max_output_len=max_o,
    )
    probe = build_workload(base, tokenizer)
    report: dict = {
        "workload": name,
        "lengths": probe.summary(),
        "caps": {"max_prompt_len": max_p, "max_output_len": max_o},
    }
    systems: dict[str, dict] = {}
    rates: list[float] = []
    slo: dict[str, float] = {}
    fixed = 0.0
    for system, flags in SYSTEMS.items():
        if args.systems and system not in args.systems:
            continue
        with running_server(*flags, kv_cache_gb=0.5) as url:
            model = await server_model(url)
            if not slo:  # measured once, on the first system, before any load
                prefill_s, tpot_s = await single_request_latency(url, probe, model)
                slo = scaled_slo(name, probe, prefill_s, tpot_s)
                est = 1.0 / prefill_s
                factors = (0.5, FIXED_FACTOR) if args.quick else RATE_FACTORS
                if args.rate_factors:
                    factors = tuple(sorted(args.rate_factors))
                rates = [round(est * f, 3) for f in factors]
                fixed = round(est * (args.fixed_factor or FIXED_FACTOR), 3)
                if fixed not in rates:
                    rates = sorted([*rates, fixed])
                report["slo"], report["rates"] = slo, rates
                print(
                    f"{name}: SLO TTFT {slo['ttft']:.2f} s, TPOT {slo['tpot']:.3f} s "
                    f"(paper x CPU/A100 latency); rates {rates}",
                    flush=True,
                )
            workload_at = lambda r: build_workload(dataclasses.replace(base, rate=r), tokenizer)  # noqa: E731
            systems[system] = await sweep_system(
                url, workload_at, rates, slo, model, args.details_dir, f"{name}-{system}", fixed
            )
    return summarize_report(report, systems, slo, fixed, out_dir)


def from_results(name: str, details_dir: str, out_dir: str, fixed_factor: float) -> dict:
    """A workload's report rebuilt from the per-rate result files of an earlier run (in
    `details_dir`); its plots written to `out_dir`."""
    systems: dict[str, dict] = {}
    slo: dict[str, float] = {}
    meta: dict = {}
    for system in SYSTEMS:
        prefix = f"{name}-{system}-rate-"
        files = sorted(
            (f for f in os.listdir(details_dir) if f.startswith(prefix) and f.endswith(".json")),
            key=lambda f: float(f[len(prefix) : -5]),
        )
        runs: dict[str, list] = {"points": [], "results": [], "rates": []}
        for f in files:
            config, summary, results = read_results(os.path.join(details_dir, f))
            slo, meta = config["slo"], config["workload"]
            runs["points"].append((config["rate"], summary["attainment"]["both"]))
            runs["results"].append(results)
            runs["rates"].append(config["rate"])
        if files:
            systems[system] = runs
    if not systems:
        raise SystemExit(f"no result files for {name} in {details_dir}")
    fixed = round(fixed_factor / slo["ours_prefill_s"], 3)
    max_p, max_o = CAPS[name]
    report = {
        "workload": name,
        "lengths": meta.get("lengths", {}),
        "caps": {"max_prompt_len": max_p, "max_output_len": max_o},
        "slo": slo,
        "rates": sorted({r for runs in systems.values() for r in runs["rates"]}),
        "rebuilt_from_results": True,
    }
    return summarize_report(report, systems, slo, fixed, out_dir)


def summarize_report(
    report: dict, systems: dict[str, dict], slo: dict, fixed: float, out_dir: str
) -> dict:
    """Goodput, SLO-scale curves and phase breakdowns per system; the plots."""
    name = report["workload"]
    summary = {}
    for system, runs in systems.items():
        g = goodput(runs["points"], 0.9)
        at_fixed = runs["results"][runs["rates"].index(fixed)]
        ok = [r for r in at_fixed if r.ok]
        summary[system] = {
            "goodput_rps": g,
            "per_core_goodput": g / CORES,
            "points": runs["points"],
            # the same runs judged against both targets scaled by s: goodput across SLOs
            "per_core_goodput_by_slo_scale": {
                s: goodput(
                    [
                        (rate, attainment(res, slo["ttft"] * s, slo["tpot"] * s)["both"])
                        for rate, res in zip(runs["rates"], runs["results"], strict=True)
                    ],
                    0.9,
                )
                / CORES
                for s in GOODPUT_SCALES
            },
            "fixed_rate": fixed,
            "slo_scale_ttft": scale_curve(at_fixed, slo, "ttft"),
            "slo_scale_tpot": scale_curve(at_fixed, slo, "tpot"),
            "min_scale": {
                k: min_slo_scale(at_fixed, slo["ttft"], slo["tpot"], 0.9, k)
                for k in ("both", "ttft", "tpot")
            },
            "phases_median_at_fixed": {
                k: statistics.median(v) for k, v in phase_breakdown(ok).items()
            },
        }
        phase_cdf(
            at_fixed,
            os.path.join(out_dir, f"breakdown-{name}-{system}.png"),
            f"{name}, {system}, {fixed} req/s",
        )
    report["systems"] = summary
    attainment_vs_x(
        {k: v["points"] for k, v in summary.items()},
        "rate (req/s)",
        os.path.join(out_dir, f"fig8-{name}.png"),
        title=f"{name}: attainment vs rate",
    )
    for which in ("ttft", "tpot"):
        attainment_vs_x(
            {k: v[f"slo_scale_{which}"] for k, v in summary.items()},
            f"{which.upper()} SLO scale",
            os.path.join(out_dir, f"fig9-{name}-{which}.png"),
            title=f"{name} at {fixed} req/s: tighter {which.upper()}",
        )
    return report


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workloads",
        default="chatbot,code,summarization",
        help="comma-separated workloads (default: all three)",
    )
    ap.add_argument(
        "--systems", default=None, help="comma-separated subset of " + ",".join(SYSTEMS)
    )
    ap.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per rate (default: 40; 16 for summarization)",
    )
    ap.add_argument(
        "--rate-factors",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="rates as multiples of one core's prefill-bound rate, comma-separated "
        f"(default: {','.join(map(str, RATE_FACTORS))})",
    )
    ap.add_argument(
        "--fixed-factor",
        type=float,
        default=None,
        help=f"rate of the SLO-scale curves, as such a multiple (default: {FIXED_FACTOR})",
    )
    ap.add_argument(
        "--from-results",
        action="store_true",
        help="serve nothing: rebuild the reports and plots from the result files of an "
        "earlier run in --details-dir",
    )
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests, two rates")
    ap.add_argument(
        "--output-dir",
        default="benchmarks/results/headline",
        help="where summary.json and plots go",
    )
    ap.add_argument(
        "--details-dir",
        default=None,
        help="where the per-rate results go (default: $DISTSERVE_RUNS_DIR or "
        "~/.cache/distserve/runs, in a directory named after --output-dir)",
    )
    args = ap.parse_args()
    args.details_dir = args.details_dir or details_dir_for(args.output_dir)
    args.systems = args.systems.split(",") if args.systems else None
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.details_dir, exist_ok=True)
    t0 = time.time()
    reports = []
    for name in args.workloads.split(","):
        if name not in PAPER:
            ap.error(f"--workloads: unknown workload {name!r} (choose from {', '.join(PAPER)})")
        if args.from_results:
            factor = args.fixed_factor or FIXED_FACTOR
            reports.append(from_results(name, args.details_dir, args.output_dir, factor))
        else:
            reports.append(asyncio.run(run_workload_experiment(name, args, args.output_dir)))
        _print_table(reports[-1])
    # a run of some workloads replaces theirs in summary.json and keeps the others
    path = os.path.join(args.output_dir, "summary.json")
    done = {r["workload"] for r in reports}
    if os.path.exists(path):
        with open(path) as f:
            reports = [r for r in json.load(f)["reports"] if r["workload"] not in done] + reports
    with open(path, "w") as f:
        json.dump({"reports": reports, "seconds": time.time() - t0}, f, indent=1, default=str)
    print(
        f"done in {(time.time() - t0) / 60:.1f} min; results in {args.output_dir}", file=sys.stderr
    )
    return 0


def _print_table(report: dict) -> None:
    slo = report["slo"]
    print(
        f"\n{report['workload']}: SLO TTFT {slo['ttft']:.2f} s / TPOT {slo['tpot']:.3f} s; "
        "per-core goodput (req/s):"
    )
    best_colo = max(
        (v["per_core_goodput"] for k, v in report["systems"].items() if k != "disagg-1P1D"),
        default=0.0,
    )
    for system, v in report["systems"].items():
        ratio = (
            f"  ({v['per_core_goodput'] / best_colo:.2f}x the best colocated)"
            if system == "disagg-1P1D" and best_colo > 0
            else ""
        )
        print(f"  {system:16s} {v['per_core_goodput']:.3f}{ratio}")
    print("  per-core goodput at SLO scale " + " / ".join(str(s) for s in GOODPUT_SCALES) + ":")
    for system, v in report["systems"].items():
        row = " / ".join(f"{g:.3f}" for g in v["per_core_goodput_by_slo_scale"].values())
        print(f"  {system:16s} {row}")
    print("  smallest SLO scale meeting 90% at the fixed rate (both / TTFT only / TPOT only):")
    for system, v in report["systems"].items():
        m = v["min_scale"]
        print(f"  {system:16s} {m['both']:.2f} / {m['ttft']:.2f} / {m['tpot']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
