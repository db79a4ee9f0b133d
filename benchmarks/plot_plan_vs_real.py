"""The CPU plan's prediction against its deployment, as a figure: for each layout that
benchmarks/plan_vs_real.py deployed, attainment measured at each rate, attainment the
simulator predicts for the same requests at the same rates (with the plan's calibration),
and the plan's predicted goodput.

    python benchmarks/plot_plan_vs_real.py [--results benchmarks/results/plan_vs_real.json]

Writes benchmarks/results/plan_vs_real.png (needs matplotlib: the `bench` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from distserve.bench.metrics import attainment, goodput
from distserve.bench.run import tokenizer_for
from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.planner.plan import read_plan
from distserve.sim.profile import load_profiles
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.simulator import Simulator
from distserve.workload.build import WorkloadSpec, build_workload

COLORS = {"disagg": "tab:blue", "colocated": "tab:orange", "chunked": "tab:green"}


def placement(choice: dict) -> PlacementConfig:
    if choice.get("colocated"):
        return PlacementConfig(
            mode="colocated",
            num_instances=choice["colocated"]["instances"],
            chunked_prefill=bool(choice.get("chunked_prefill")),
        )
    return PlacementConfig(
        mode="disagg",
        num_prefill=choice["prefill"]["instances"],
        num_decode=choice["decode"]["instances"],
    )


def simulated(report: dict, plan: dict, name: str, rates: list[float]) -> list[float]:
    """Attainment the simulator predicts for the layout at each rate, on the requests the
    benchmark sent (same spec and seed)."""
    profile = load_profiles(report["profile"])[0]
    choice = plan["disagg"] if name == "disagg" else plan["baselines"][name]
    place = placement(choice)
    sp = plan["serving_path"]
    opts = SimOptions(
        step_overhead=sp["step_overhead"],
        compute_scale=sp["compute_scale"],
        decode_scale=sp.get("decode_scale"),
        contended_scale=sp.get("contended_scale"),
        contended_decode_scale=sp.get("contended_decode_scale"),
        transfer_bandwidth=sp["transfer_bandwidth"],
        scheduler=SchedulerConfig(
            max_num_seqs=64,
            max_num_batched_tokens=2048,
            max_model_len=2048,
            chunked_prefill=place.chunked_prefill,
        ),
    )
    config = sim_config(place, profile, None, opts)
    spec = report["workload_spec"]
    base = WorkloadSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    tok = tokenizer_for("smollm2-135m")
    slo = report["slo"]
    out = []
    for rate in rates:
        wl = build_workload(dataclasses.replace(base, rate=rate), tok)
        out.append(attainment(Simulator(config).run(wl), slo["ttft"], slo["tpot"])["both"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--results",
        default="benchmarks/results/plan_vs_real.json",
        help="plan_vs_real.py's results JSON",
    )
    ap.add_argument("--output", default="benchmarks/results/plan_vs_real.png", help="figure")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ap.error("matplotlib is missing: pip install -e '.[bench]'")
    with open(args.results) as f:
        report = json.load(f)
    if "workload_spec" not in report:
        ap.error(f"--results: {args.results} predates the workload spec field; rerun plan_vs_real")
    plan = read_plan(report["plan"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, row in report["layouts"].items():
        points = sorted(row["points"])
        rates = [r for r, _ in points]
        per_core = [r / row["devices"] for r in rates]
        color = COLORS.get(name, "black")
        sim = simulated(report, plan, name, rates)
        ax.plot(per_core, [100 * a for _, a in points], "o-", color=color, label=f"{name} measured")
        ax.plot(per_core, [100 * a for a in sim], "x--", color=color, label=f"{name} simulated")
        ax.axvline(row["predicted_per_core"], color=color, linestyle=":", linewidth=1)
        sim_goodput = goodput(list(zip(rates, sim, strict=True)), 0.9) / row["devices"]
        print(
            f"{name}: predicted {row['predicted_per_core']:.3f} req/s per core, measured "
            f"{row['measured_per_core']:.3f}, simulated on the measured requests "
            f"{sim_goodput:.3f}; simulated attainment at the measured rates (req/s): "
            + ", ".join(f"{r:.3f}: {100 * a:.0f}%" for r, a in zip(rates, sim, strict=True))
        )
    ax.axhline(90, color="grey", linewidth=0.8)
    ax.set_xlabel("rate per core (req/s); dotted: the plan's predicted goodput")
    ax.set_ylabel("SLO attainment (%)")
    slo = report["slo"]
    ax.set_title(
        f"SmolLM2 on 2 CPU cores: plan vs deployment "
        f"(TTFT {slo['ttft']:.2f} s, TPOT {1000 * slo['tpot']:.0f} ms)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
