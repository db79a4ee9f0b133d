"""Issue 20, experiment 2: OPT-66B chatbot on 4 nodes x 8 emulated A100s. The planner's
placement (replicated instances) and its colocated baseline (vLLM's A100 coefficients),
each deployed with `serve --plan --emulate` on the plan's 4 emulated nodes and swept with
`distserve goodput`, next to the simulator's prediction for the same requests; and what
the emulated deployment costs its one process per step (CPU and lateness).

    python benchmarks/emulated_66b.py [--num-requests 200] [--factors 0.8,0.9,1,1.1,1.2]

The paper's setting, copied from ../shared/reference/README.md ("Paper facts", the
OSDI'24 version): OPT-66B chatbot on ShareGPT, SLO TTFT 2.5 s / TPOT 0.15 s, 90%
attainment; a testbed of 4 nodes x 8 A100-80GB, NVLink within a node, 25 Gbps across
(`config.CROSS_NODE_BANDWIDTH`); the paper's own OPT-66B placement was prefill tp4,
decode tp2 pp2.

1. `distserve plan --profile a100 --profile-baseline a100-vllm --model opt-66b
   --num-nodes 4 --devices-per-node 8 --dataset chatbot --ttft-slo 2.5 --tpot-slo 0.15
   --transfer-bandwidth 3.125e9` (Algorithm 1; KV over the 25 Gbps cross-node link,
   because the emulated layout puts the planned decode instance, 8 devices, on a node of
   its own, so every migration crosses nodes: checked below), written to
   benchmarks/results/emulated-plan-66b.json.
2. For each layout: `serve --emulate PROFILE --plan LAYOUT --max-num-seqs 128
   --no-prefix-caching` (the sweep sends the same prompts at every rate: with the cache,
   every rate after the first is served from it; the simulator runs without it too; nodes
   and devices per node from the plan), then `distserve goodput` at the simulator's
   goodput on these requests (found on a grid of 0.3-3x the planned goodput, step 0.1x)
   times each factor; beside each rate the simulator on exactly the requests sent, with
   the link the emulated migrations take.
3. Overhead: per back-to-back step, the time beyond the latency model's (from the step
   trace); and the serving process's CPU seconds (controller, emulated devices, HTTP
   server: one process) per instance step and per streamed token.

Emulated devices run in the controller's event loop, not as Ray actors, so the 4 nodes
are emulated nodes of one process (`serve --emulate` refuses `--ray-address`). Writes
benchmarks/results/emulated_66b.json; per-request results and step traces go to the runs
directory (`distserve.bench.runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import psutil

from distserve.bench.runs import details_dir_for
from distserve.bench.server_process import running_server
from distserve.cluster.emulation import layout
from distserve.config import (
    CROSS_NODE_BANDWIDTH,
    NVLINK_BANDWIDTH,
    EmulationConfig,
    PlacementConfig,
)
from distserve.metrics.goodput import goodput
from distserve.metrics.summary import summarize
from distserve.model.metadata import tokenizer_for
from distserve.planner.plan import layout_text
from distserve.sim.simulator import Simulator
from distserve.workload.build import WorkloadSpec, build_workload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emulated_goodput import (  # noqa: E402
    PROFILES,
    entry,
    latency_split,
    sim_config,
    step_overheads,
)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SLO = {"ttft": 2.5, "tpot": 0.15}
"""The paper's OPT-66B chatbot SLO (OSDI'24; v1 of the paper had 0.4 s / 0.1 s)."""
NODES, PER_NODE = 4, 8


def make_plan(path: str) -> dict:
    if not os.path.exists(path):
        cmd = [
            sys.executable, "-m", "distserve.cli", "plan", "--profile", "a100",
            "--profile-baseline", "a100-vllm", "--model", "opt-66b", "--num-nodes",
            str(NODES), "--devices-per-node", str(PER_NODE), "--dataset", "chatbot",
            "--ttft-slo", str(SLO["ttft"]), "--tpot-slo", str(SLO["tpot"]),
            "--transfer-bandwidth", f"{CROSS_NODE_BANDWIDTH:g}", "--output", path,
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    with open(path, encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def placement_of(e: dict) -> PlacementConfig:
    if e.get("colocated"):
        s = e["colocated"]
        return PlacementConfig(
            mode="colocated", num_instances=s["instances"], prefill_tp=s["tp"],
            prefill_pp=s["pp"], emulated=True,
        )  # fmt: skip
    p, d = e["prefill"], e["decode"]
    return PlacementConfig(
        num_prefill=p["instances"], num_decode=d["instances"], prefill_tp=p["tp"],
        prefill_pp=p["pp"], decode_tp=d["tp"], decode_pp=d["pp"], emulated=True,
    )  # fmt: skip


def migration_links(placement: PlacementConfig) -> dict:
    """Where each emulated instance lands on the 4 x 8 nodes, and how many (prefill,
    decode) pairs are on one node or across: the simulator has one KV bandwidth, so it
    is exact only when every pair takes the same link."""
    spots = layout(placement, EmulationConfig(num_nodes=NODES, devices_per_node=PER_NODE))
    nodes = [(role, node) for role, (node, _) in zip(placement.roles, spots, strict=True)]
    pre = [n for r, n in nodes if r == "prefill"]
    dec = [n for r, n in nodes if r == "decode"]
    same = sum(a == b for a in pre for b in dec)
    return {
        "nodes_by_role": {r: sorted({n for q, n in nodes if q == r}) for r, _ in nodes},
        "pairs_within_node": same,
        "pairs_across_nodes": len(pre) * len(dec) - same,
    }


def server_process() -> psutil.Process:
    """The `distserve serve` child of this process (controller, devices, HTTP: one)."""
    for child in psutil.Process().children(recursive=True):
        if "serve" in child.cmdline():
            return child
    raise RuntimeError("no serve process among this process's children")


def fit_nodes(e: dict) -> dict:
    """The plan entry with as many replicas as the emulated nodes hold: the planner counts
    a cluster's devices (5 x tp3 pp2 = 30 of 32 GPUs), the emulation keeps each instance
    on one node (one 6-GPU instance per 8-GPU node); goodput and devices scale with the
    replicas, so the goodput per device is the plan's."""
    key = "colocated" if e.get("colocated") else "prefill"
    planned = e[key]["instances"]
    for n in range(planned, 0, -1):
        fit = json.loads(json.dumps(e))
        fit[key]["instances"] = n
        fit["devices"] = e["devices"] * n // planned
        fit["goodput"] = e["goodput"] * n / planned
        try:
            layout(placement_of(fit), EmulationConfig(num_nodes=NODES, devices_per_node=PER_NODE))
        except ValueError:
            if key == "prefill":  # a disaggregated plan is deployed as planned or not at all
                raise
            continue
        return fit | ({"planned_instances": planned} if n < planned else {})
    raise ValueError(f"no replica of {e} fits {NODES} nodes of {PER_NODE} devices")


def run_layout(plan: dict, name: str, args: argparse.Namespace, details: str) -> dict:
    e = fit_nodes(entry(plan, name))
    links = migration_links(placement_of(e))
    if links["pairs_within_node"] and links["pairs_across_nodes"]:
        print(f"{name}: migrations take both links; simulating at the cross-node one")
    bandwidth = NVLINK_BANDWIDTH if not links["pairs_across_nodes"] else CROSS_NODE_BANDWIDTH
    plan_e = plan | ({"disagg": e} if name == "disagg" else {"baselines": {name: e}})
    config = dataclasses.replace(sim_config(plan_e, name, bandwidth), prefix_caching=False)
    spec = WorkloadSpec(dataset="chatbot", num_requests=args.num_requests, rate=1.0)
    tok = tokenizer_for("smollm2-135m")

    def simulated(rate: float) -> dict:
        wl = build_workload(dataclasses.replace(spec, rate=rate), tok)
        return summarize(Simulator(config).run(wl), SLO["ttft"], SLO["tpot"], wl.duration)

    grid = [round(e["goodput"] * k / 10, 3) for k in range(3, 31)]  # 0.3-3x planned
    crossing = goodput([(r, simulated(r)["attainment"]["both"]) for r in grid], 0.9)
    rates = [round(crossing * f, 3) for f in args.factors]
    path = os.path.join(details, f"plan-{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plan | {"placement": e, "recommended": name}, f)
    trace = os.path.join(details, f"steps-{name}.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    flags = ["--emulate", PROFILES[name], "--plan", path, "--max-num-seqs", "128"]
    flags.append("--no-prefix-caching")  # else the rates after the first hit the cache
    load = [os.getloadavg()[0]]
    out = os.path.join(details, f"goodput-{name}.json")
    with running_server(*flags, "--trace-steps", trace) as url:
        server = server_process()
        cpu0, t0 = server.cpu_times(), time.perf_counter()
        cmd = [
            sys.executable, "-m", "distserve.cli", "goodput", "--base-url", url, "--model",
            "smollm2-135m", "--dataset", "chatbot", "--num-requests", str(args.num_requests),
            "--rates", ",".join(map(str, rates)), "--ttft-slo", str(SLO["ttft"]),
            "--tpot-slo", str(SLO["tpot"]), "--devices", str(e["devices"]), "--no-progress",
            "--output", out, "--output-dir", os.path.join(details, name),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        cpu1, wall = server.cpu_times(), time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    with open(out, encoding="utf-8") as f:
        sweep = json.load(f)
    points, sim_points, tokens = [], [], 0
    for run in sweep["runs"]:
        rate = run["rate"]
        sim = simulated(rate)
        sim_points.append((rate, sim["attainment"]["both"]))
        with open(run["file"], encoding="utf-8") as f:
            real = json.load(f)
        tokens += sum(r.get("output_len") or 0 for r in real["requests"])
        points.append(
            {"rate": rate, "measured": run["attainment"], "simulated": sim["attainment"]}
            | latency_split(real["requests"], sim)
        )
    overhead = step_overheads(trace)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    overhead |= {
        "server_cpu_seconds": cpu,
        "server_cpu_share": cpu / wall,
        "server_cpu_per_step_ms": 1e3 * cpu / overhead["steps"],
        "server_cpu_per_token_us": 1e6 * cpu / tokens if tokens else None,
        "tokens_streamed": tokens,
    }
    row = {
        "layout": name,
        "profile": PROFILES[name],
        "devices": e["devices"],
        "instances": layout_text(e),
        "planned_instances": e.get("planned_instances"),
        "links": links,
        "simulated_bandwidth": bandwidth,
        "planned_goodput": e["goodput"],
        "measured_goodput": sweep["goodput"],
        "measured_interval": sweep["goodput_interval"],
        "simulated_goodput": goodput(sim_points, 0.9),
        "simulated_goodput_fine": crossing,
        "host_load_average": load,
        "points": points,
        "overhead": overhead,
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    p.add_argument(
        "--factors",
        default="0.8,0.9,1,1.1,1.2",
        help="rates: the simulator's goodput on the same requests x these",
    )
    p.add_argument("--layouts", default="disagg,colocated", help="plan entries to deploy")
    p.add_argument("--plan", default=os.path.join(RESULTS, "emulated-plan-66b.json"))
    p.add_argument("--output", default=os.path.join(RESULTS, "emulated_66b.json"))
    args = p.parse_args()
    args.factors = [float(x) for x in args.factors.split(",")]
    plan = make_plan(args.plan)
    details = details_dir_for(args.output)
    os.makedirs(details, exist_ok=True)
    rows = [run_layout(plan, name, args, details) for name in args.layouts.split(",")]
    out = {"slo": SLO, "num_requests": args.num_requests, "factors": args.factors, "rows": rows}
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        per = {k: r[f"{k}_goodput"] / r["devices"] for k in ("planned", "simulated", "measured")}
        gap = per["measured"] / per["simulated"] - 1 if per["simulated"] else float("nan")
        o = r["overhead"]
        print(
            f"{r['layout']:10s} {r['instances']} ({r['devices']} GPUs) per GPU: planned "
            f"{per['planned']:.3f}, simulated {per['simulated']:.3f}, measured "
            f"{per['measured']:.3f} req/s ({100 * gap:+.1f}%); beyond the model per step "
            f"{o['beyond_model_mean_ms']:.2f} ms mean; server CPU "
            f"{o['server_cpu_per_step_ms']:.2f} ms/step, {100 * o['server_cpu_share']:.0f}%"
        )


if __name__ == "__main__":
    main()
