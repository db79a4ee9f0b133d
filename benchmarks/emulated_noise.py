"""The noise floor of `emulated_goodput.py`'s per-GPU goodput (issue 20, experiment 1),
from the simulator alone (no server; ~10 min on one core): at the sweep's rates, per layout,
(a) the chatbot workload's seeds 0-9 at 200 requests (the benchmark uses seed 0), the
same on a finer grid of rates; (b) seed 0 with a step overhead of 0, 0.5 and 1 ms;
(c) 1,000 requests, seeds 0 and 1. Prints per-GPU goodputs.

    python benchmarks/emulated_noise.py
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulated_goodput as E  # noqa: E402

from distserve.metrics.goodput import goodput  # noqa: E402
from distserve.metrics.summary import summarize  # noqa: E402
from distserve.model.metadata import tokenizer_for  # noqa: E402
from distserve.sim.simulator import Simulator  # noqa: E402
from distserve.workload.build import WorkloadSpec, build_workload  # noqa: E402

with open(os.path.join(E.RESULTS, "emulated-plan.json"), encoding="utf-8") as f:
    plan = json.load(f)
with open(os.path.join(E.RESULTS, "emulated_goodput.json"), encoding="utf-8") as f:
    res = json.load(f)
tok = tokenizer_for("smollm2-135m")


def gp(
    name: str, n: int, seed: int, so: float = 0.0, rates: list[float] | None = None
) -> tuple[float, list[tuple[float, float]]]:
    """Per-GPU goodput of layout `name` simulated on n chatbot requests of `seed` at
    `rates`, each step `so` seconds longer."""
    e = E.entry(plan, name)
    pts = []
    for r in rates or []:
        wl = build_workload(WorkloadSpec(dataset="chatbot", num_requests=n, rate=r, seed=seed), tok)
        out = Simulator(E.sim_config(plan, name, step_overhead=so)).run(wl)
        s = summarize(out, E.SLO["ttft"], E.SLO["tpot"], wl.duration)
        pts.append((r, s["attainment"]["both"]))
    return goodput(pts, 0.9) / e["devices"], pts


def spread(xs: list[float]) -> str:
    values = [round(x, 3) for x in xs]
    return f"{values} median {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def main() -> None:
    for row in res["rows"]:
        name = row["layout"]
        rates = [p["rate"] for p in row["points"]]
        devices = E.entry(plan, name)["devices"]
        fine = [round(rates[0] * (0.5 + 0.1 * k), 3) for k in range(16)]
        print(f"{name}: rates {rates}; measured {row['measured_goodput'] / devices:.3f}, "
              f"simulated {row['simulated_goodput'] / devices:.3f} per GPU (seed 0)")  # fmt: skip
        print(
            "  200 requests, seeds 0-9:",
            spread([gp(name, 200, s, rates=rates)[0] for s in range(10)]),
        )
        print(
            "  the same, finer rates:", spread([gp(name, 200, s, rates=fine)[0] for s in range(10)])
        )
        for so in (0.0, 0.0005, 0.001):
            print(
                f"  seed 0, step overhead {so * 1e3:.1f} ms: {gp(name, 200, 0, so, rates)[0]:.3f}"
            )
        big = [gp(name, 1000, s, rates=fine)[0] for s in (0, 1)]
        print(f"  1,000 requests, seeds 0 / 1, finer rates: {big[0]:.3f} / {big[1]:.3f}")


if __name__ == "__main__":
    main()
