"""Adaptive layout vs fixed layouts on a workload whose mix shifts: the real controller,
routing, migration and role flips, on two emulated A100s serving OPT-13B (no math: the
profile's step times), so that phases of thousands of requests run in minutes.

    python benchmarks/adaptive_shift.py [--workload shift|stable] [--phase-seconds 60]
        [--long-seconds S] [--short-seconds S] [--cycles 2] [--rounds 1]
        [--output benchmarks/results/adaptive_shift.json]

The trace alternates (synthetic, lengths uniform in the ranges below, Poisson arrivals):
  long    prompts 1500-2000 tokens, outputs 50-150, 4 req/s (summarization-like)
  short   prompts 50-200 tokens, outputs 20-60, 40 req/s (code-completion-like)
(the rates: --long-rate, --short-rate; each phase lasts --phase-seconds, or --long-seconds and
--short-seconds apart, e.g. to balance the two phases' request counts). Targets: TTFT 0.3 s,
TPOT 0.06 s (both, per request).
With --workload stable instead: a chatbot workload, ShareGPT's prompt and output lengths
(the `chatbot` dataset measured with SmolLM2's tokenizer; token ids random), Poisson at
--stable-rate for --stable-seconds, the paper's OPT-13B chatbot targets (TTFT 0.25 s,
TPOT 0.1 s). Systems, the same requests each:
  adaptive   starts colocated x2; serve --adaptive a100 --live-window 20 (re-plan every
             5 s on the window's latest 400 finished requests, margin 0.05, dwell 10 s,
             layouts predicted at 1.2x the window's rate; --replan-interval,
             --replan-margin, --replan-dwell, --replan-load); its layouts: colocated,
             chunked (CHUNK tokens a step, serve --replan-chunk), k prefill + 2-k decode
  colocated  2 colocated instances, fixed
  1P1D       1 prefill + 1 decode instance, fixed
  chunked    2 colocated instances with chunked prefill (serve --chunked-prefill; a token
             budget of --chunk tokens a step), fixed
With --rounds N the systems run in turns, the order reversed every round.
Reported: SLO attainment (both targets) per phase and overall, the flips made (when, to
what), and requests lost (must be 0).

With --sim-only, the simulator's prediction of the same systems on the same requests
instead (`simulate --adaptive`: the same re-plan policy, sim/replan.py, on the virtual
clock; seconds, not minutes), written to benchmarks/results/adaptive_shift_sim.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from typing import Any

from distserve.cluster.adaptive import AdaptiveConfig
from distserve.cluster.controller import Controller
from distserve.cluster.live import LiveWindow
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import SamplingParams
from distserve.core.config import SchedulerConfig

SLOS = {"shift": (0.3, 0.06), "stable": (0.25, 0.1)}
"""(TTFT, TPOT) targets per workload."""
TTFT, TPOT = SLOS["shift"]
WINDOW = 20.0
"""Seconds of traffic the re-plans look at (serve --live-window): a third of a phase."""
SIM_STEP_OVERHEAD = 0.0
"""Seconds the simulated instances' steps take beyond the model (--sim-step-overhead)."""
REPLAN = {"interval": 5.0, "margin": 0.05, "dwell": 10.0, "load": 1.2}
"""The adaptive system's re-plan settings (serve --replan-interval/-margin/-dwell)."""
CHUNK = 512
"""The chunked system's token budget a step (Sarathi's usual chunk)."""
PHASES = {"long": (4.0, (1500, 2000), (50, 150)), "short": (40.0, (50, 200), (20, 60))}
SYSTEMS = ("adaptive", "colocated", "1P1D", "chunked")


def stable(seconds: float, rate: float, seed: int = 0) -> list[tuple[float, str, int, int]]:
    """(arrival, 'chatbot', prompt_len, output_len): ShareGPT chatbot lengths (SmolLM2's
    tokenizer), Poisson arrivals at `rate` for `seconds`."""
    from distserve.model.metadata import tokenizer_for
    from distserve.workload.build import WorkloadSpec, load_samples

    samples, _, _ = load_samples(WorkloadSpec(dataset="chatbot"), tokenizer_for("smollm2-135m"))
    rng, t = random.Random(seed), 0.0
    out: list[tuple[float, str, int, int]] = []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        prompt, olen = samples[rng.randrange(len(samples))]
        out.append((t, "chatbot", len(prompt), olen))


def placement(system: str, emulated: bool = False) -> PlacementConfig:
    if system == "1P1D":
        return PlacementConfig(mode="disagg", emulated=emulated)
    return PlacementConfig(
        mode="colocated", num_instances=2, chunked_prefill=system == "chunked", emulated=emulated
    )


def scheduler(system: str) -> SchedulerConfig:
    if system == "chunked":
        return SchedulerConfig(max_num_batched_tokens=CHUNK, chunked_prefill=True)
    return SchedulerConfig()


def adaptive_config() -> AdaptiveConfig:
    return AdaptiveConfig(
        "a100", TTFT, TPOT, REPLAN["interval"], REPLAN["margin"], REPLAN["dwell"],
        chunk=CHUNK, load=REPLAN["load"]
    )  # fmt: skip


def trace(
    phase_seconds: dict[str, float], cycles: int, seed: int = 0
) -> list[tuple[float, str, int, int]]:
    """(arrival, phase, prompt_len, output_len), phases alternating long, short, ...; each
    phase lasts its `phase_seconds[name]`."""
    rng, out, t0 = random.Random(seed), [], 0.0
    for _ in range(cycles):
        for name in PHASES:
            rate, plen, olen = PHASES[name]
            span = phase_seconds[name]
            t = t0
            while True:
                t += rng.expovariate(rate)
                if t >= t0 + span:
                    break
                out.append((t, name, rng.randint(*plen), rng.randint(*olen)))
            t0 += span
    return out


def report(system: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Attainment overall and per phase, requests lost, TTFT p90."""
    ok = [r for r in results if "error" not in r]
    by_phase: dict[str, list[bool]] = {}
    for r in ok:
        by_phase.setdefault(r["phase"], []).append(r["ok"])
    return {
        "system": system,
        "requests": len(results),
        "lost": len(results) - len(ok),
        "errors": dict(Counter(r["error"] for r in results if "error" in r)),
        "attainment": sum(r["ok"] for r in ok) / len(results),
        "attainment_by_phase": {k: sum(v) / len(v) for k, v in by_phase.items()},
        "ttft_p90": statistics.quantiles([r["ttft"] for r in ok], n=10)[-1],
    }


def simulated(system: str, requests: list[tuple[float, str, int, int]]) -> dict[str, Any]:
    """The simulator's prediction of `run(system, requests)`: the emulated devices' latency
    model and KV capacity, the same requests (prompt ids drawn as `run` draws them)."""
    import dataclasses

    from distserve.cluster.emulation import model_profiles, role_latency
    from distserve.sim.serving_path import ServingPath
    from distserve.sim.simulator import SimConfig, Simulator
    from distserve.workload import Workload, WorkloadRequest

    lat, blocks = role_latency(model_profiles("a100", "opt-13b"), 1, 1, 16)
    lat = dataclasses.replace(lat, path=ServingPath(step_overhead=SIM_STEP_OVERHEAD))
    roles = ("prefill", "decode", "colocated")
    config = SimConfig(
        placement(system), {r: lat for r in roles}, {r: blocks for r in roles}, scheduler(system)
    )
    if system == "adaptive":
        config = dataclasses.replace(config, adaptive=adaptive_config(), live_window=WINDOW)
    rng = random.Random(1)
    wl = Workload(
        tuple(
            WorkloadRequest(i, t, tuple(rng.randrange(100, 250) for _ in range(plen)), olen)
            for i, (t, _, plen, olen) in enumerate(requests)
        )
    )
    sim = Simulator(config)
    out = [
        {"phase": phase, "ttft": r.ttft, "tpot": r.tpot,
         "ok": r.ttft <= TTFT and r.tpot <= TPOT}  # type: ignore[operator]
        if r.e2e is not None
        else {"phase": phase, "error": "unfinished"}
        for r, (_, phase, _, _) in zip(sim.run(wl), requests, strict=True)
    ]  # fmt: skip
    flips = [{k: round(v, 2) if isinstance(v, float) else v for k, v in f.items()}
             for f in sim.flips]  # fmt: skip
    return report(f"{system} (simulated)", out) | {
        "flips": flips,
        "flip_times_s": [f["at"] for f in flips],
        "replans": len(sim.adaptive.replans) if sim.adaptive else 0,
    }


async def run(system: str, requests: list[tuple[float, str, int, int]]) -> dict[str, Any]:
    adaptive = adaptive_config() if system == "adaptive" else None
    c = Controller(
        EngineConfig(model="opt-13b", scheduler=scheduler(system)),
        placement(system, emulated=True),
        emulation=EmulationConfig(tokenizer="bytes"),
        adaptive=adaptive,
        live=LiveWindow(WINDOW, TTFT, TPOT),
    )
    await c.start()
    rng = random.Random(1)
    start = time.perf_counter()

    async def one(arrival: float, phase: str, plen: int, olen: int) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        ids = [rng.randrange(100, 250) for _ in range(plen)]
        params = SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        try:
            stamps = [time.perf_counter() async for _ in c.stream(c.submit(ids, params))]
        except Exception as e:  # counted as lost
            return {"phase": phase, "error": str(e)}
        ttft = stamps[0] - t0
        tpot = (stamps[-1] - stamps[0]) / (olen - 1) if olen > 1 else 0.0
        return {"phase": phase, "ttft": ttft, "tpot": tpot, "ok": ttft <= TTFT and tpot <= TPOT}

    try:
        results = await asyncio.gather(*(one(*r) for r in requests))
        flips = [
            {"at": round(f.started - start, 1),
             "instance": f.instance, "old": f.old, "new": f.new, "seconds": round(f.seconds, 2)}
            for f in c.flips.done
        ]  # fmt: skip
        flip_times = [f.started - start for f in c.flips.done]
    finally:
        await c.stop()
    return report(system, list(results)) | {
        "flips": flips,
        "flip_times_s": [round(t, 1) for t in flip_times],
    }


def main() -> None:
    global WINDOW, TTFT, TPOT, PHASES, SIM_STEP_OVERHEAD
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=("shift", "stable"), default="shift")
    ap.add_argument("--phase-seconds", type=float, default=60.0, help="length of each phase")
    for name in PHASES:
        ap.add_argument(f"--{name}-seconds", type=float, default=None,
                        help=f"length of each {name} phase (default: --phase-seconds)")  # fmt: skip
    ap.add_argument("--cycles", type=int, default=2, help="long+short cycles")
    ap.add_argument("--long-rate", type=float, default=PHASES["long"][0], help="req/s, long")
    ap.add_argument("--short-rate", type=float, default=PHASES["short"][0], help="req/s, short")
    ap.add_argument(
        "--short-output",
        default=None,
        metavar="MIN,MAX",
        help="output lengths of the short phase's requests, tokens (default: "
        f"{PHASES['short'][2][0]},{PHASES['short'][2][1]})",
    )
    ap.add_argument("--stable-rate", type=float, default=2.0, help="req/s, --workload stable")
    ap.add_argument("--stable-seconds", type=float, default=120.0, help="--workload stable")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems to run")
    ap.add_argument(
        "--live-window",
        default=f"{WINDOW:g}",
        help="seconds of traffic the adaptive system's re-plans look at (serve --live-window); "
        "a comma-separated list runs the adaptive system once with each",
    )
    for k, v in REPLAN.items():
        ap.add_argument(f"--replan-{k}", type=float, default=v, help=f"adaptive: {k}")
    ap.add_argument(
        "--rounds", type=int, default=1, help="systems in turns N times, order reversed each round"
    )
    ap.add_argument(
        "--sim-only",
        action="store_true",
        help="only the simulator's prediction of each system (simulate --adaptive)",
    )
    ap.add_argument(
        "--sim-step-overhead",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="--sim-only: the simulated instances' steps take this long beyond the model, "
        "as the real runtime's control plane does (~0.001-0.0013 s a step measured by "
        "benchmarks/emulated_goodput.py); their re-plans predict with it (default: 0)",
    )
    ap.add_argument(
        "--write-trace",
        default=None,
        metavar="CSV",
        help="only write the requests as a trace (timestamp, prompt_len, output_len) for "
        "`distserve simulate --dataset trace`, and exit",
    )
    ap.add_argument("--output", default=None, help="JSON (default: benchmarks/results/"
                    "adaptive_shift.json, adaptive_shift_sim.json with --sim-only)")  # fmt: skip
    args = ap.parse_args()
    windows = [float(w) for w in args.live_window.split(",")]
    if args.sim_step_overhead and not args.sim_only:
        ap.error("--sim-step-overhead goes with --sim-only")
    if args.sim_step_overhead < 0:
        ap.error(f"--sim-step-overhead: must be >= 0, got {args.sim_step_overhead}")
    SIM_STEP_OVERHEAD = args.sim_step_overhead
    REPLAN.update(interval=args.replan_interval, margin=args.replan_margin,
                  dwell=args.replan_dwell, load=args.replan_load)  # fmt: skip
    TTFT, TPOT = SLOS[args.workload]
    if args.output is None:
        stem = "adaptive_shift" if args.workload == "shift" else "adaptive_stable"
        args.output = f"benchmarks/results/{stem}{'_sim' if args.sim_only else ''}.json"
    if args.workload == "shift":
        short_out = PHASES["short"][2]
        if args.short_output:
            try:
                lo, hi = (int(x) for x in args.short_output.split(","))
            except ValueError:
                ap.error(f"--short-output: expected MIN,MAX tokens, got {args.short_output!r}")
            if not 1 <= lo <= hi:
                ap.error(f"--short-output: need 1 <= MIN <= MAX, got {args.short_output!r}")
            short_out = (lo, hi)
        PHASES = {"long": (args.long_rate, *PHASES["long"][1:]),
                  "short": (args.short_rate, PHASES["short"][1], short_out)}  # fmt: skip
        spans = {name: getattr(args, f"{name}_seconds") or args.phase_seconds for name in PHASES}
        requests = trace(spans, args.cycles)
        seconds = sum(spans.values()) * args.cycles
    else:
        requests = stable(args.stable_seconds, args.stable_rate)
        seconds = args.stable_seconds
    if args.write_trace:
        with open(args.write_trace, "w", encoding="utf-8") as f:
            f.write("timestamp,prompt_len,output_len\n")
            f.writelines(f"{t:.6f},{p},{o}\n" for t, _, p, o in requests)
        print(f"wrote {args.write_trace}")
        return
    print(f"{len(requests)} requests over {seconds:.0f} s", flush=True)
    out = []
    runs = [
        (system, w)
        for system in args.systems.split(",")
        for w in (windows if system == "adaptive" else [windows[0]])
    ]
    for rnd in range(1 if args.sim_only else args.rounds):
        for system, WINDOW in runs if rnd % 2 == 0 else runs[::-1]:
            began = time.strftime("%H:%M:%S")
            sim, real = simulated, lambda s, r: asyncio.run(run(s, r))
            r = (sim if args.sim_only else real)(system, requests)
            if system == "adaptive":
                r["system"] += f", live window {WINDOW:g} s"
            r |= {"round": rnd + 1, "began": began, "ended": time.strftime("%H:%M:%S")}
            out.append(r)
            phases = ", ".join(f"{p} {v:.3f}" for p, v in r["attainment_by_phase"].items())
            print(
                f"round {rnd + 1} {r['began']}-{r['ended']} {r['system']:32} attainment "
                f"{r['attainment']:.3f} ({phases}), lost {r['lost']}, flips at "
                f"{r['flip_times_s']} s",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"command": "python benchmarks/adaptive_shift.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" if v is not True else f"--{k.replace('_', '-')}"
            for k, v in vars(args).items() if k != "output" and v not in (False, None)
        ), "ttft_slo": TTFT, "tpot_slo": TPOT, "date": time.strftime("%Y-%m-%d %H:%M"),
            "requests": len(requests), "results": out}, f, indent=1)  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
