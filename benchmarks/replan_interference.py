"""Does a re-plan hurt the serving it re-plans for? Two emulated A100s serving OPT-13B
with chunked prefill (the real controller, no HTTP), adaptive_shift.py's short phase:
prompts 50-200 tokens, outputs 150-250, Poisson at --rate; both targets (TTFT 0.3 s, TPOT
0.06 s) per request. Beside it, every --interval seconds after the last one ended, one
re-plan's simulations (sim/replan.py's `predict` on a 400-request window of the same
mix, 3 layouts), run

  none      not at all
  thread    in a thread of the controller's process (as cluster/adaptive.py did)
  process   in a process of its own at nice 10 (cluster/adaptive.py's `_replan_process`)

The arms run in turns, the order reversed every round.

    python benchmarks/replan_interference.py [--seconds 40] [--rounds 2]
        [--output benchmarks/results/replan_interference.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adaptive_shift as shift  # noqa: E402

from distserve.cluster.adaptive import _replan_process  # noqa: E402
from distserve.cluster.emulation import model_profiles, role_latency  # noqa: E402
from distserve.sim.profile import load_profiles  # noqa: E402
from distserve.sim.replan import pick_profile, predict, window_workload  # noqa: E402

ARMS = ("none", "thread", "process")


def replanner(
    arm: str, interval: float, stop: threading.Event, took: list[float]
) -> Callable[[], None]:
    """The re-plan loop of an arm (to run in a thread of its own)."""
    profile = pick_profile(load_profiles("a100"), "opt-13b")
    _, blocks = role_latency(model_profiles("a100", "opt-13b"), 1, 1, 16)
    rng = random.Random(3)
    rows = [
        (t, tuple(rng.randrange(100, 250) for _ in range(p)), o)
        for t, _, p, o in shift.trace({"long": 0.0, "short": 60.0}, 1)[:400]
    ]
    window = window_workload(rows, limit=400)
    args = (window, profile, blocks, shift.TTFT, shift.TPOT, 2, shift.CHUNK, 1.2)

    def loop() -> None:
        pool = _replan_process() if arm == "process" else None
        try:
            while not stop.wait(interval):
                t0 = time.perf_counter()
                if pool is None:
                    predict(*args)
                else:
                    pool.submit(predict, *args).result()
                took.append(time.perf_counter() - t0)
        finally:
            if pool is not None:
                pool.shutdown()

    return loop


async def one(arm: str, requests: list[Any], interval: float) -> dict[str, Any]:
    stop, took = threading.Event(), []
    thread = None
    if arm != "none":
        thread = threading.Thread(target=replanner(arm, interval, stop, took), daemon=True)
        thread.start()
    began = time.strftime("%H:%M:%S")
    try:
        r = await shift.run("chunked", requests)
    finally:
        stop.set()
    if thread is not None:
        thread.join()
    return {
        "arm": arm,
        "began": began,
        "attainment": r["attainment"],
        "ttft_p90": r["ttft_p90"],
        "lost": r["lost"],
        "replans": len(took),
        "replan_seconds_mean": statistics.mean(took) if took else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="traffic per arm (default: 40)")
    ap.add_argument("--rate", type=float, default=15.0, help="requests/s (default: 15)")
    ap.add_argument(
        "--interval", type=float, default=2.0, help="seconds between re-plans (default: 2)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all arms (default: 2)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    ap.add_argument("--output", default="benchmarks/results/replan_interference.json")
    args = ap.parse_args()
    arms = args.arms.split(",")
    if not arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms: choose from {', '.join(ARMS)}")
    if not (args.seconds > 0 and args.rate > 0 and args.interval > 0 and args.rounds >= 1):
        ap.error("--seconds, --rate and --interval must be > 0, --rounds >= 1")
    shift.PHASES["short"] = (args.rate, (50, 200), (150, 250))
    requests = shift.trace({"long": 0.0, "short": args.seconds}, 1)
    out = []
    for rnd in range(args.rounds):
        for arm in arms if rnd % 2 == 0 else arms[::-1]:
            r = asyncio.run(one(arm, requests, args.interval)) | {"round": rnd + 1}
            out.append(r)
            print(
                f"round {rnd + 1} {r['began']} {arm:8} attainment {r['attainment']:.3f}, "
                f"TTFT p90 {r['ttft_p90']:.3f} s, lost {r['lost']}, {r['replans']} re-plans "
                f"of {r['replan_seconds_mean']:.2f} s",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {"command": "python benchmarks/replan_interference.py " + " ".join(sys.argv[1:]),
             "date": time.strftime("%Y-%m-%d %H:%M"), "requests": len(requests),
             "results": out},
            f, indent=1,
        )  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
