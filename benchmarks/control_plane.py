"""The control plane's ceiling: how many tokens per second one controller process routes
and streams before it, not the devices, is the bottleneck.

    python benchmarks/control_plane.py [--instances 8] [--rates 50,100,200,400]
        [--seconds 20] [--output benchmarks/results/control_plane.json]

Emulated devices (no math) whose step times are the A100 OPT-13B profile's divided by
`--speedup` (100: a decode step of ~0.2 ms), `--instances` colocated instances, requests
of 64 prompt and 64 output tokens arriving (Poisson) at each rate for `--seconds` s. The
same requests go through the simulator, which has no control plane: its TPOT is what the
devices alone give. Per rate: tokens/s streamed, the controller process's CPU share, and
the share of requests whose TPOT is over 1.5x the simulator's for that request (slowed by
the control plane). The ceiling: the highest rate at which that share stays under 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import resource
import time
from typing import Any

from distserve.cluster.controller import Controller
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import SamplingParams
from distserve.sim.profile import bundled_a100, find, load_profiles, save_profiles
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.simulator import Simulator
from distserve.workload.spec import Workload, WorkloadRequest

PROMPT, OUTPUT = 64, 64


def fast_profile(speedup: float, path: str) -> None:
    """The A100 OPT-13B tp1 profile with every time divided by `speedup`."""
    p = find(bundled_a100(), "opt-13b", 1)

    def scale(t: tuple[float, float, float]) -> tuple[float, float, float]:
        return (t[0] / speedup, t[1] / speedup, t[2] / speedup)

    fast = dataclasses.replace(
        p,
        prefill=scale(p.prefill),
        decode_small=scale(p.decode_small),
        decode_large=scale(p.decode_large),
        source=f"the A100 OPT-13B profile / {speedup:g} (benchmarks/control_plane.py)",
    )
    save_profiles(path, [fast])


def workload(rate: float, seconds: float, seed: int = 0) -> Workload:
    rng, t, reqs = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        ids = tuple(rng.randrange(100, 250) for _ in range(PROMPT))
        reqs.append(WorkloadRequest(len(reqs), t, ids, OUTPUT))
    return Workload(tuple(reqs))


async def measure(
    placement: PlacementConfig, emulation: EmulationConfig, wl: Workload
) -> dict[str, Any]:
    c = Controller(
        EngineConfig(model="opt-13b"), placement, emulation=emulation, degrade_after=None
    )
    await c.start()
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async def one(wr: WorkloadRequest) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, start + wr.arrival - time.perf_counter()))
        params = SamplingParams(max_tokens=wr.output_len, ignore_eos=True, temperature=0)
        stamps = [
            time.perf_counter() async for _ in c.stream(c.submit(list(wr.prompt_token_ids), params))
        ]
        return (
            stamps[0] - start - wr.arrival,
            (stamps[-1] - stamps[0]) / (wr.output_len - 1),
            wr.output_len,
        )

    try:
        got = await asyncio.gather(*(one(wr) for wr in wl.requests))
    finally:
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        await c.stop()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "ttft": [g[0] for g in got],
        "tpot": [g[1] for g in got],
        "tokens": sum(g[2] for g in got),
        "wall": wall,
        "cpu": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=8, help="colocated emulated instances")
    ap.add_argument("--rates", default="50,100,200,400", help="request rates (req/s) to try")
    ap.add_argument("--seconds", type=float, default=20.0, help="arrivals per rate (s)")
    ap.add_argument("--speedup", type=float, default=100.0, help="profile times divided by this")
    ap.add_argument("--output", default="benchmarks/results/control_plane.json", help="JSON")
    args = ap.parse_args()
    path = "/tmp/distserve-control-plane-profile.json"
    fast_profile(args.speedup, path)
    emulation = EmulationConfig(profile=path, tokenizer="bytes", devices_per_node=args.instances)
    placement = PlacementConfig(mode="colocated", num_instances=args.instances, emulated=True)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        wl = workload(rate, args.seconds)
        sim_profile = find(load_profiles(path), "opt-13b", 1)
        sim = Simulator(sim_config(placement, sim_profile, None, SimOptions(num_blocks=10_000)))
        by_index = {r.index: r.tpot or 0.0 for r in sim.run(wl)}
        sim_list = [by_index[wr.index] for wr in wl.requests]
        real = asyncio.run(measure(placement, emulation, wl))
        slow = sum(t > 1.5 * s for t, s in zip(real["tpot"], sim_list, strict=True))
        row = {
            "rate": rate,
            "requests": len(wl),
            "tokens_per_s": real["tokens"] / real["wall"],
            "controller_cpu_share": real["cpu"] / real["wall"],
            "slowed_share": slow / len(wl),
            "tpot_median_ms": sorted(real["tpot"])[len(wl) // 2] * 1e3,
            "sim_tpot_median_ms": sorted(sim_list)[len(wl) // 2] * 1e3,
        }
        rows.append(row)
        print(
            f"rate {rate:6.0f}/s: {row['tokens_per_s']:8.0f} tokens/s streamed, controller CPU "
            f"{row['controller_cpu_share']:.0%}, TPOT median {row['tpot_median_ms']:.2f} ms "
            f"(simulator {row['sim_tpot_median_ms']:.2f}), slowed >1.5x: {row['slowed_share']:.1%}",
            flush=True,
        )
    ok = [r for r in rows if r["slowed_share"] < 0.01]
    ceiling = max((r["tokens_per_s"] for r in ok), default=0.0)
    print(f"ceiling (<1% of requests slowed): {ceiling:.0f} tokens/s")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
        out = {"command": f"python benchmarks/control_plane.py {flags}", "rows": rows}
        out |= {"date": time.strftime("%Y-%m-%d %H:%M"), "ceiling_tokens_per_s": ceiling}
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
