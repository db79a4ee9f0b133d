"""The per-request rule (serve --prefill-on-decode) on a code-like mix in 1P1D: the real
controller, routing and migration on two emulated A100s serving OPT-13B (the profile's step
times, no math), with and without the rule, the same requests, runs interleaved; and the
simulator's prediction of each on the same requests.

    python benchmarks/prefill_on_decode.py [--seconds 30] [--rates 30,40] [--repeats 2]
        [--ttft-slo 0.125] [--tpot-slo 0.2] [--output benchmarks/results/prefill_on_decode.json]

Requests (synthetic, lengths uniform, Poisson arrivals): prompts 50-200 tokens (--prompt-len),
outputs 20-60 (the code-like phase of benchmarks/adaptive_shift.py). Targets (both, per request):
TTFT 0.125 s, TPOT 0.2 s by default (the DistServe paper's code-completion targets); the
rule's stall bound is the TPOT target.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import time
from typing import Any

from distserve.cluster.controller import Controller
from distserve.cluster.decode_prefill import DecodePrefillConfig
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig
from distserve.core import SamplingParams

TTFT, TPOT = 0.125, 0.2
OUTPUT = (20, 60)
Req = tuple[float, list[int], int]


def trace(rate: float, seconds: float, prompt: tuple[int, int], seed: int = 0) -> list[Req]:
    """(arrival, prompt token ids, output length)."""
    rng, out, t = random.Random(seed), [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        ids = [rng.randrange(100, 250) for _ in range(rng.randint(*prompt))]
        out.append((t, ids, rng.randint(*OUTPUT)))


async def emulated(requests: list[Req], rule: bool) -> dict[str, Any]:
    c = Controller(
        EngineConfig(model="opt-13b"),
        PlacementConfig(mode="disagg", emulated=True),
        emulation=EmulationConfig(tokenizer="bytes"),
        prefill_on_decode=DecodePrefillConfig(TPOT) if rule else None,
    )
    await c.start()
    start = time.perf_counter()

    async def one(arrival: float, ids: list[int], olen: int) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        params = SamplingParams(max_tokens=olen, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        try:
            stamps = [time.perf_counter() async for _ in c.stream(c.submit(ids, params))]
        except Exception as e:  # counted as lost
            return {"error": str(e)}
        ttft, tpot = stamps[0] - t0, (stamps[-1] - stamps[0]) / max(1, olen - 1)
        return {"ttft": ttft, "tpot": tpot}

    try:
        results = await asyncio.gather(*(one(*r) for r in requests))
        migrations = sum(c.migration.completed.values())
    finally:
        await c.stop()
    return summary(results) | {"migrations": migrations}


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    n = len(results)
    return {
        "requests": n,
        "lost": n - len(ok),
        "attainment": sum(r["ttft"] <= TTFT and r["tpot"] <= TPOT for r in ok) / n,
        "ttft_attainment": sum(r["ttft"] <= TTFT for r in ok) / n,
        "tpot_attainment": sum(r["tpot"] <= TPOT for r in ok) / n,
    }


def simulated(requests: list[Req], rule: bool) -> dict[str, Any]:
    from distserve.cluster.emulation import model_profiles, role_latency
    from distserve.sim.simulator import SimConfig, Simulator
    from distserve.workload import Workload, WorkloadRequest

    lat, blocks = role_latency(model_profiles("a100", "opt-13b"), 1, 1, 16)
    config = SimConfig(
        PlacementConfig(mode="disagg"),
        {r: lat for r in ("prefill", "decode", "colocated")},
        {r: blocks for r in ("prefill", "decode", "colocated")},
    )
    config = dataclasses.replace(config, prefill_on_decode=TPOT if rule else None)
    sim = Simulator(config)
    wl = Workload(
        tuple(WorkloadRequest(i, t, tuple(ids), o) for i, (t, ids, o) in enumerate(requests))
    )
    res = sim.run(wl)
    return summary(
        [{"ttft": r.ttft, "tpot": r.tpot} if r.e2e is not None else {"error": "x"} for r in res]
    ) | {"prefilled_on_decode": sim.prefilled_on_decode}


def main() -> None:
    global TTFT, TPOT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    ap.add_argument("--rates", default="30,40", help="comma-separated request rates (req/s)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved off/on pairs per rate")
    ap.add_argument("--sim-only", action="store_true", help="only the simulator's prediction")
    ap.add_argument("--output", default="benchmarks/results/prefill_on_decode.json", help="JSON")
    ap.add_argument("--ttft-slo", type=float, default=TTFT, help="TTFT target (s)")
    ap.add_argument("--tpot-slo", type=float, default=TPOT, help="TPOT target (s)")
    ap.add_argument("--prompt-len", default="50,200", help="prompt lengths LO,HI (tokens)")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    TTFT, TPOT = args.ttft_slo, args.tpot_slo
    out = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for rep in range(1 if args.sim_only else args.repeats):
            requests = trace(rate, args.seconds, (lo, hi), seed=rep)
            for rule in (False, True):
                row: dict[str, Any] = {"rate": rate, "seed": rep, "rule": rule}
                row["sim"] = simulated(requests, rule)
                if not args.sim_only:
                    row["emulated"] = asyncio.run(emulated(requests, rule))
                out.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"command": "python benchmarks/prefill_on_decode.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if k != "output" and v is not False
        ), "ttft_slo": TTFT, "tpot_slo": TPOT, "date": time.strftime("%Y-%m-%d %H:%M"),
            "results": out}, f, indent=1)  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
