"""Tensor- and pipeline-parallel instances against tp=1 on this CPU: does splitting an
instance across cores pay?

    python benchmarks/parallel_instances.py [--rounds 5] [--prompt-len 512]
        [--decode-batch 8] [--context 512] [--output benchmarks/results/parallel_instances.json]

SmolLM2 (bf16) in Ray workers, each pinned to its own cores, as `serve` runs them:

  tp1 x1     one worker on 1 core (the baseline)
  tp1 x2     one worker on 2 cores (torch's own threads: the peer that is not ours)
  tp3        3 workers, SmolLM2's 9 heads split 3 ways (2 cores: one is shared)
  pp2        2 pipeline stages of 15 layers, 1 core each; two slots

Per shape: a `--prompt-len` prefill (batch 1), a decode step of `--decode-batch`
sequences at `--context` tokens, and for pp2 the time per prefill with both slots busy
(the pipeline's point: two steps in flight). Then the KV of one prefilled prompt migrated
tp1 -> tp1 (Ray object store), tp3 -> tp1 and tp1 -> tp3 (re-sharded through the driver).
Rounds interleave the shapes, order reversed every round; medians and min-max printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from typing import Any

from distserve.cluster.placement import init_ray, start_executor
from distserve.config import EngineConfig
from distserve.core import CacheConfig
from distserve.runtime.transport import transfer_blocks
from distserve.runtime.worker.synthetic import SyntheticPlans

SHAPES = {
    "tp1 x1": (1, 1, [0]),
    "tp1 x2": (1, 1, [0, 1]),
    "tp3": (3, 1, [0, 1]),
    "pp2": (1, 2, [0, 1]),
}


async def timed(coro: Any) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    init_ray(None, 8)
    engine = EngineConfig(dtype="bfloat16", cache=CacheConfig(num_blocks=1024))
    slots = {}
    for name, (tp, pp, cores) in SHAPES.items():
        tag = name.replace(" ", "")
        slots[name] = await start_executor(engine, cores, f"bench-{tag}", True, tp, pp)
    infos = {n: await s[0].info() for n, s in slots.items()}
    plans = {n: SyntheticPlans(i.num_blocks, i.block_size, 49152) for n, i in infos.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in SHAPES}
    order = list(SHAPES)
    for r in range(args.rounds + 1):  # round 0: warm-up, not recorded
        for name in order if r % 2 else order[::-1]:
            ex, p = slots[name], plans[name]
            got: dict[str, float] = {}
            await ex[0].execute(p.prefill(args.prompt_len, 1))  # excluded: the first of a kind
            got["prefill"] = await timed(ex[0].execute(p.prefill(args.prompt_len, 1)))
            p.release()
            step = p.decode(args.decode_batch, args.context)
            got["decode"] = statistics.median([await timed(ex[0].execute(step)) for _ in range(5)])
            if len(ex) > 1:  # both slots busy: time per prefill
                two = [p.prefill(args.prompt_len, 1) for _ in ex]
                t = await timed(
                    asyncio.gather(*(e.execute(q) for e, q in zip(ex, two, strict=True)))
                )
                got["prefill, slots busy"] = t / len(ex)
            p.release()
            if r:
                for k, v in got.items():
                    samples[name].setdefault(k, []).append(v)
        print(f"round {r}/{args.rounds}", flush=True)
    migrations: dict[str, list[float]] = {}
    blocks = list(range(-(-args.prompt_len // 16)))
    pairs = [("tp1 x1", "tp1 x2"), ("tp3", "tp1 x1"), ("tp1 x1", "tp3")]
    for r in range(args.rounds + 1):
        for src, dst in pairs if r % 2 else pairs[::-1]:
            t = await timed(transfer_blocks(slots[src][0], blocks, slots[dst][0], blocks))
            if r:
                migrations.setdefault(f"{src} -> {dst}", []).append(t)
    for s in slots.values():
        for e in s:
            await e.close()
    return {"steps": samples, "migrations": migrations}


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def report(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    steps = {n: {k: summary(v) for k, v in d.items()} for n, d in raw["steps"].items()}
    migs = {k: summary(v) for k, v in raw["migrations"].items()}
    base = steps["tp1 x1"]
    print(f"\n{'shape':10} {'kind':22} {'median ms':>10} {'min-max ms':>16} {'vs tp1 x1':>9}")
    for name, d in steps.items():
        for kind, s in d.items():
            ref = base[kind.split(",")[0]]["median"]
            print(
                f"{name:10} {kind:22} {s['median'] * 1e3:10.1f} "
                f"{s['min'] * 1e3:7.1f}-{s['max'] * 1e3:<8.1f} {ref / s['median']:8.2f}x"
            )
    for k, s in migs.items():
        print(
            f"migration {k:20} {s['median'] * 1e3:10.1f} {s['min'] * 1e3:7.1f}-{s['max'] * 1e3:.1f}"
        )
    return {
        "command": "python benchmarks/parallel_instances.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": steps,
        "migrations": migs,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after a warm-up)")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument(
        "--decode-batch", type=int, default=8, help="sequences of the timed decode step"
    )
    ap.add_argument("--context", type=int, default=512, help="KV tokens of each decoding sequence")
    ap.add_argument(
        "--output", default="benchmarks/results/parallel_instances.json", help="JSON to write"
    )
    a = ap.parse_args()
    out = report(asyncio.run(main(a)), a)
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.output}")
