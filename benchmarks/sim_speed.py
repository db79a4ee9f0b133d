"""Simulator speed: 1,000 ShareGPT requests per placement, on one core.

    taskset -c 0 python benchmarks/sim_speed.py [--output benchmarks/results/sim_speed.json]

Uses the paper's A100 OPT-13B profile (so load and batch sizes are realistic), Poisson
arrivals at a rate near the placements' capacity. Goal: <= 1 s per 1,000 requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from distserve.config import PlacementConfig
from distserve.core import SchedulerConfig
from distserve.model.metadata import tokenizer_for
from distserve.sim.profile import bundled_a100, find
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.simulator import Simulator
from distserve.workload.build import WorkloadSpec, build_workload

PLACEMENTS = {
    "disagg-1P1D": PlacementConfig(mode="disagg"),
    "disagg-2P1D": PlacementConfig(mode="disagg", num_prefill=2),
    "colocated-2": PlacementConfig(mode="colocated", num_instances=2),
    "chunked-2": PlacementConfig(mode="colocated", num_instances=2, chunked_prefill=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--num-requests", type=int, default=1000, help="requests per run (default: 1000)"
    )
    ap.add_argument("--rate", type=float, default=3.0, help="arrivals per second (default: 3)")
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="runs per placement; the median is reported (default: 3)",
    )
    ap.add_argument("--output", default="benchmarks/results/sim_speed.json", help="results JSON")
    args = ap.parse_args()
    wl = build_workload(
        WorkloadSpec(dataset="chatbot", num_requests=args.num_requests, rate=args.rate),
        tokenizer_for("smollm2-135m"),
    )
    profile = find(bundled_a100(), "opt-13b", 1)
    out = {
        "num_requests": args.num_requests,
        "rate": args.rate,
        "cores": len(os.sched_getaffinity(0)),
        "seconds": {},
    }
    for name, placement in PLACEMENTS.items():
        chunked = placement.chunked_prefill
        sched = SchedulerConfig(
            max_num_seqs=128,
            max_num_batched_tokens=512 if chunked else 2048,
            chunked_prefill=chunked,
        )
        config = sim_config(placement, profile, None, SimOptions(scheduler=sched))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            Simulator(config).run(wl)
            times.append(time.perf_counter() - t0)
        out["seconds"][name] = statistics.median(times)
        print(
            f"{name:12s} {args.num_requests} requests: {statistics.median(times):.2f} s "
            f"(median of {args.reps})",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
