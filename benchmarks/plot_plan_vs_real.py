"""The CPU plan's prediction against its deployment, as a figure: for each layout that
benchmarks/plan_vs_real.py deployed, attainment measured at each rate, attainment the
simulator predicts for the same requests at the same rates (with the plan's calibration,
and replayed at the speed each run's own step trace shows), and the plan's predicted
goodput.

    python benchmarks/plot_plan_vs_real.py [--results benchmarks/results/plan_vs_real.json]

Writes benchmarks/results/plan_vs_real.png (needs matplotlib: the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys

from distserve.metrics.goodput import goodput

COLORS = {"disagg": "tab:blue", "colocated": "tab:orange", "chunked": "tab:green"}


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
    if any("simulated_attainment_replayed" not in row for row in report["layouts"].values()):
        ap.error(f"--results: {args.results} predates replayed attainment; rerun plan_vs_real")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for name, row in report["layouts"].items():
        rows = sorted(
            zip(
                row["points"],
                row["simulated_attainment"],
                row["simulated_attainment_replayed"],
                strict=True,
            )
        )
        rates = [r for (r, _), _, _ in rows]
        sim = [s for _, s, _ in rows]
        per_core = [r / row["devices"] for r in rates]
        color = COLORS.get(name, "black")
        measured = [100 * a for (_, a), _, _ in rows]
        ax.plot(per_core, measured, "o-", color=color, label=f"{name} measured")
        ax.plot(per_core, [100 * a for a in sim], "x--", color=color, label=f"{name} simulated")
        replayed = [
            (x, 100 * a) for x, (_, _, a) in zip(per_core, rows, strict=True) if a is not None
        ]
        ax.plot(
            [x for x, _ in replayed],
            [a for _, a in replayed],
            "+:",
            color=color,
            alpha=0.6,
            label=f"{name} simulated at the run's own speed",
        )
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
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
