"""The paper's Figure 8 through the real runtime, small: OPT-13B chatbot on 4 emulated
A100s. The planner's disaggregated placement and its colocated baseline (vLLM's A100
coefficients), each deployed with `serve --plan --emulate` and swept with `distserve
goodput`, next to the simulator's prediction for the same requests; and the emulation's
overhead per step, read from the servers' step traces.

    python benchmarks/emulated_goodput.py [--num-requests 200] [--factors 0.6,0.8,1,1.2]

1. `distserve plan --profile a100 --profile-baseline a100-vllm --model opt-13b
   --devices-per-node 4 --dataset chatbot --ttft-slo 0.25 --tpot-slo 0.1
   --transfer-bandwidth 3e11` (the paper's SLOs for this pair; KV moves over NVLink as on
   the emulated node), written to benchmarks/results/emulated-plan.json.
2. For each layout: `serve --emulate PROFILE --plan LAYOUT --max-num-seqs 128
   --no-prefix-caching` (the plan's batch limit; no cache, since the sweep re-sends the
   same prompts at every rate, and the simulator beside it runs without one too), then
   `distserve goodput` at the plan's predicted goodput times each factor. Beside each
   measured rate: the simulator's attainment on exactly the requests sent (same lengths,
   same arrival times), and the goodput both imply.
3. Overhead per step: for back-to-back steps of an instance, the time from one step's
   start to the next one's beyond the latency model's time for the first (the controller's
   own work between steps, and how late the emulated device woke up).
Writes benchmarks/results/emulated_goodput.json; per-request results and step traces go
to the runs directory (`distserve.bench.runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.cluster.emulation import role_latency
from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.metrics.goodput import goodput
from distserve.metrics.summary import summarize
from distserve.model.metadata import tokenizer_for
from distserve.sim.profile import load_profiles
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload.build import WorkloadSpec, build_workload

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SLO = {"ttft": 0.25, "tpot": 0.1}
BANDWIDTH = 3e11
PROFILES = {"disagg": "a100", "colocated": "a100-vllm", "chunked": "a100-vllm"}
"""The engine each layout is scored and emulated on (the paper compares with vLLM)."""
SCHED = SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=2048)


def make_plan(path: str) -> dict:
    if not os.path.exists(path):
        cmd = [
            sys.executable, "-m", "distserve.cli", "plan", "--profile", "a100",
            "--profile-baseline", "a100-vllm", "--model", "opt-13b", "--devices-per-node", "4",
            "--dataset", "chatbot", "--ttft-slo", str(SLO["ttft"]), "--tpot-slo",
            str(SLO["tpot"]), "--transfer-bandwidth", f"{BANDWIDTH:g}", "--output", path,
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    with open(path, encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def entry(plan: dict, name: str) -> dict:
    return plan["disagg"] if name == "disagg" else plan["baselines"][name]


def sim_config(
    plan: dict, name: str, bandwidth: float = BANDWIDTH, step_overhead: float = 0.0
) -> SimConfig:
    """The simulator's configuration of a layout, as the planner scores it: a pipeline of
    pp stages is pp virtual instances (`cluster.emulation.role_latency`, the planner's
    `staged` profile and KV share, which the emulated devices use too); KV migrates at
    `bandwidth` bytes/s."""
    e = entry(plan, name)
    profiles = load_profiles(PROFILES[name])
    latency, blocks, counts = {}, {}, {}
    for role in ("prefill", "decode", "colocated"):
        if e.get(role):
            shape = e[role]
            mine = [p for p in profiles if p.model == plan["model"]]
            latency[role], blocks[role] = role_latency(mine, shape["tp"], shape["pp"], 16)
            latency[role] = dataclasses.replace(
                latency[role],
                path=ServingPath(transfer_bandwidth=bandwidth, step_overhead=step_overhead),
            )
            counts[role] = shape["instances"] * shape["pp"]
    if "colocated" in counts:
        chunked = bool(e.get("chunked_prefill"))
        placement = PlacementConfig(
            mode="colocated", num_instances=counts["colocated"], chunked_prefill=chunked
        )
    else:
        placement = PlacementConfig(num_prefill=counts["prefill"], num_decode=counts["decode"])
    sched = dataclasses.replace(SCHED, chunked_prefill=placement.chunked_prefill)
    # no prefix caching, as the servers run: the sweep re-sends the same prompts at every rate
    return SimConfig(placement, latency, blocks, sched, 16, prefix_caching=False)


def step_overheads(trace: str) -> dict:
    """Per back-to-back step: next start - (start + model time), and the part of it
    inside the executor call (the device's wake-up error)."""
    steps: dict[str, list[dict]] = {}
    with open(trace, encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            steps.setdefault(s["instance"], []).append(s)
    gaps, wake = [], []
    for seq in steps.values():
        for a, b in zip(seq, seq[1:], strict=False):
            wake.append(a["seconds"] - a["exec"])
            gap = b["t"] - a["t"] - a["exec"]
            if gap < a["seconds"] - a["exec"] + 0.005:  # b started at once: back to back
                gaps.append(gap)
    q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [0.0] * 99
    exec_mean = statistics.mean(s["exec"] for seq in steps.values() for s in seq)
    return {
        "steps": sum(len(s) for s in steps.values()),
        "back_to_back": len(gaps),
        "model_step_mean_ms": 1e3 * exec_mean,
        "beyond_model_mean_ms": 1e3 * statistics.mean(gaps),
        "beyond_model_p50_ms": 1e3 * q[49],
        "beyond_model_p99_ms": 1e3 * q[98],
        "wake_error_mean_ms": 1e3 * statistics.mean(wake),
        "wake_error_abs_mean_ms": 1e3 * statistics.mean(abs(w) for w in wake),
    }


def run_layout(plan: dict, name: str, args: argparse.Namespace, details: str) -> dict:
    e = entry(plan, name)
    rates = [round(e["goodput"] * f, 3) for f in args.factors]
    path = os.path.join(details, f"plan-{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plan | {"placement": e, "recommended": name}, f)
    trace = os.path.join(details, f"steps-{name}.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    flags = ["--emulate", PROFILES[name], "--plan", path, "--max-num-seqs", "128"]
    flags.append("--no-prefix-caching")  # else the rates after the first hit the cache
    flags += ["--api-servers", str(args.api_servers)]
    load = [os.getloadavg()[0]]
    with running_server(*flags, "--trace-steps", trace) as url:
        out = os.path.join(details, f"goodput-{name}.json")
        cmd = [
            sys.executable, "-m", "distserve.cli", "goodput", "--base-url", url, "--model",
            "smollm2-135m", "--dataset", "chatbot", "--num-requests", str(args.num_requests),
            "--rates", ",".join(map(str, rates)), "--ttft-slo", str(SLO["ttft"]),
            "--tpot-slo", str(SLO["tpot"]), "--devices", str(e["devices"]), "--no-progress",
            "--output", out, "--output-dir", os.path.join(details, name),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    load.append(os.getloadavg()[0])
    row = analyse(plan, name, args.num_requests, details) | {"host_load_average": load}
    print(json.dumps(row, indent=1), flush=True)
    return row


def analyse(
    plan: dict,
    name: str,
    num_requests: int,
    details: str,
    step_overhead: float = 0.0,
    frontend: float = 0.0,
) -> dict:
    """A layout's row from its run's files in `details` (the sweep's per-request results
    and the step trace): the simulator on the same requests beside each measured rate, its
    steps `step_overhead` s longer and its TTFTs `frontend` s longer than the model's."""
    e = entry(plan, name)
    with open(os.path.join(details, f"goodput-{name}.json"), encoding="utf-8") as f:
        sweep = json.load(f)
    spec = WorkloadSpec(dataset="chatbot", num_requests=num_requests, rate=1.0)
    tok = tokenizer_for("smollm2-135m")
    points, sim_points = [], []
    for run in sweep["runs"]:
        rate = run["rate"]
        wl = build_workload(dataclasses.replace(spec, rate=rate), tok)
        results = Simulator(sim_config(plan, name, step_overhead=step_overhead)).run(wl)
        sim = summarize(results, SLO["ttft"], SLO["tpot"], wl.duration)
        sim_points.append((rate, sim["attainment"]["both"]))
        with open(run["file"], encoding="utf-8") as f:
            real = json.load(f)
        points.append(
            {"rate": rate, "measured": run["attainment"], "simulated": sim["attainment"]}
            | latency_split(real["requests"], sim)
            | {"paired": paired(real["requests"], results, frontend)}
        )
    return {
        "layout": name,
        "profile": PROFILES[name],
        "devices": e["devices"],
        "planned_goodput": e["goodput"],
        "measured_goodput": sweep["goodput"],
        "measured_interval": sweep["goodput_interval"],
        "simulated_goodput": goodput(sim_points, 0.9),
        "points": points,
        "paired_total": paired_total(points),
        "overhead": step_overheads(os.path.join(details, f"steps-{name}.jsonl")),
    }


def paired(requests: list[dict], sim: list, frontend: float = 0.0) -> dict:
    """The same requests, measured and simulated: how many missed the SLO in the runtime
    only and in the simulator only, with TTFT as the client timed it (against the
    simulator's plus `frontend`) and as the server stamped it (without the HTTP frontend,
    against the simulator's own). Equal counts: the two differ by chance."""
    by_index = {r.index: r for r in sim}
    out = {"runtime_only": 0, "sim_only": 0, "runtime_only_server": 0, "sim_only_server": 0}

    def ok(ttft: float | None, tpot: float | None, extra: float = 0.0) -> bool:
        return ttft is not None and ttft + extra <= SLO["ttft"] and (tpot or 0) <= SLO["tpot"]

    for r in requests:
        s = by_index[r["index"]]
        sim_client, sim_server = ok(s.ttft, s.tpot, frontend), ok(s.ttft, s.tpot)
        client = ok(r.get("ttft"), r.get("tpot"))
        server = ok((r.get("server") or {}).get("prefill_end"), r.get("tpot"))
        out["runtime_only"] += sim_client and not client
        out["sim_only"] += client and not sim_client
        out["runtime_only_server"] += sim_server and not server
        out["sim_only_server"] += server and not sim_server
    return out


def paired_total(points: list[dict]) -> dict:
    """The paired counts over every rate, and the two-sided sign test's p-value of each
    pair of counts (McNemar's exact test: how likely so lopsided a split by chance)."""
    total = {k: sum(p["paired"][k] for p in points) for k in points[0]["paired"]}
    for suffix in ("", "_server"):
        b, c = total[f"runtime_only{suffix}"], total[f"sim_only{suffix}"]
        n, k = b + c, min(b, c)
        p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
        total[f"p_value{suffix}"] = min(1.0, 2 * p)
    return total


def latency_split(requests: list[dict], sim: dict) -> dict:
    """Mean TTFT as the client saw it, as the server stamped it (first token computed),
    and as the simulator has it; the difference of the first two is the frontend's
    (HTTP, streaming, the client's own process)."""
    served = [r for r in requests if r.get("server") and r.get("ttft") is not None]
    return {
        "ttft_mean_client": statistics.mean(r["ttft"] for r in served),
        "ttft_mean_server": statistics.mean(r["server"]["prefill_end"] for r in served),
        "ttft_mean_simulated": sim["ttft"]["mean"],
        "tpot_mean_client": statistics.mean(r["tpot"] for r in served if r["tpot"]),
        "tpot_mean_simulated": sim["tpot"]["mean"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--factors", default="0.6,0.8,1,1.2", help="rates: planned goodput x these")
    p.add_argument("--layouts", default="disagg,colocated")
    p.add_argument(
        "--api-servers",
        type=int,
        default=0,
        help="serve --api-servers: HTTP processes apart from the controller's (default: 0)",
    )
    p.add_argument("--output", default=os.path.join(RESULTS, "emulated_goodput.json"))
    p.add_argument(
        "--reanalyse",
        action="store_true",
        help="no servers: recompute --output's rows from the last run's files in its runs "
        "directory (the simulator beside each rate, the paired counts, the step overheads)",
    )
    p.add_argument(
        "--sim-step-overhead",
        type=float,
        default=0.0,
        help="with --reanalyse: seconds the simulator adds to each step (default: 0)",
    )
    p.add_argument(
        "--sim-frontend",
        type=float,
        default=0.0,
        help="with --reanalyse: seconds added to each simulated TTFT in the paired counts "
        "(an HTTP frontend; default: 0)",
    )
    args = p.parse_args()
    if (args.sim_step_overhead or args.sim_frontend) and not args.reanalyse:
        p.error("--sim-step-overhead and --sim-frontend go with --reanalyse")
    args.factors = [float(x) for x in args.factors.split(",")]
    plan = make_plan(os.path.join(RESULTS, "emulated-plan.json"))
    details = details_dir_for(args.output)
    os.makedirs(details, exist_ok=True)
    if args.reanalyse:
        with open(args.output, encoding="utf-8") as f:
            old = {r["layout"]: r for r in json.load(f)["rows"]}
        rows = [
            analyse(
                plan, name, args.num_requests, details, args.sim_step_overhead, args.sim_frontend
            )
            | {"host_load_average": old.get(name, {}).get("host_load_average")}
            for name in args.layouts.split(",")
        ]
    else:
        rows = [run_layout(plan, name, args, details) for name in args.layouts.split(",")]
    out = {"slo": SLO, "num_requests": args.num_requests, "factors": args.factors}
    out |= {"api_servers": args.api_servers, "rows": rows}
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        print(
            f"{r['layout']:10s} per device: planned {r['planned_goodput'] / r['devices']:.3f}, "
            f"simulated {r['simulated_goodput'] / r['devices']:.3f}, measured "
            f"{r['measured_goodput'] / r['devices']:.3f} req/s; beyond the model per step "
            f"{r['overhead']['beyond_model_mean_ms']:.2f} ms mean; misses in the runtime only / "
            f"the simulator only: {r['paired_total']['runtime_only']} / "
            f"{r['paired_total']['sim_only']} (p = {r['paired_total']['p_value']:.4f}; server-"
            f"timed {r['paired_total']['runtime_only_server']} / "
            f"{r['paired_total']['sim_only_server']})"
        )


if __name__ == "__main__":
    main()
