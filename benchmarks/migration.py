"""KV migration on this machine: bandwidth per transport next to the memcpy ceiling, and
the share of time to first token that migration takes on the real serving path.

    python benchmarks/migration.py [--quick] [--output benchmarks/results/migration.json]

1. memcpy: `dst.copy_(src)` between preallocated tensors of each transfer's size.
2. Bandwidth: the blocks of a 512- and a 2048-token prompt moved by `transfer_blocks`
   between two workers: in-process copy (two LocalExecutors in this process), and between
   the prefill and decode Ray actors of a 1P1D controller over shared memory, the Ray
   object store and torch.distributed gloo. Median over repetitions, after warm-up.
3. TTFT share: through the same controllers, 512-token prompts (random token ids,
   max_tokens=2) sent one after another; per request, migration = migration_end -
   migration_start (request timestamps), TTFT = first output received - arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams
from distserve.runtime.executor import Executor, LocalExecutor
from distserve.runtime.transport import TransferStats, transfer_blocks
from distserve.runtime.worker.worker import Worker

PROMPT_TOKENS = (512, 2048)
RAY_TRANSPORTS = ("shm", "object-store", "gloo")


def memcpy_seconds(num_bytes: int, reps: int, warmup: int) -> float:
    """Median seconds of one copy of `num_bytes` between two preallocated tensors."""
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.zeros(num_bytes, dtype=torch.uint8)
    times = []
    for i in range(warmup + reps):
        t = time.perf_counter()
        dst.copy_(src)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


async def transfer_seconds(
    src: Executor, dst: Executor, num_blocks: int, reps: int, warmup: int
) -> tuple[float, int, str]:
    """Median seconds, bytes and transport of moving blocks [0, n) of `src` into [0, n) of
    `dst` (both idle: their instance loops have no requests)."""
    blocks = list(range(num_blocks))
    stats: list[TransferStats] = []
    for _ in range(warmup + reps):
        stats.append(await transfer_blocks(src, blocks, dst, blocks))
    measured = stats[warmup:]
    return (
        statistics.median(s.seconds for s in measured),
        measured[0].num_bytes,
        measured[0].transport,
    )


class MigrationLog:
    """Observer that keeps the TransferStats of every migration."""

    def __init__(self) -> None:
        self.stats: list[TransferStats] = []

    def on_first_token(self, ttft: float) -> None:
        pass

    def on_finished(self, outcome: str, tpot: float | None) -> None:
        pass

    def on_migration(self, stats: TransferStats) -> None:
        self.stats.append(stats)


async def ttft_share(controller: Controller, log: MigrationLog, n: int, tokens: int) -> dict:
    """Send `n` prompts of `tokens` random ids one after another (plus one for warm-up)."""
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    migrations, ttfts = [], []
    for i in range(n + 1):
        prompt = torch.randint(100, 40000, (tokens,), generator=gen).tolist()
        first = None
        async for out in controller.stream(controller.submit(prompt, params)):
            first = first or time.monotonic()
            final = out
        ts = final.timestamps
        if i > 0:
            migrations.append(ts["migration_end"] - ts["migration_start"])
            ttfts.append(first - ts["arrived"])
    transfers = [s.seconds for s in log.stats[1:]]
    shares = [m / t for m, t in zip(migrations, ttfts, strict=True)]
    return {
        "requests": n,
        "prompt_tokens": tokens,
        "migration_ms": 1000 * statistics.median(migrations),
        "transfer_ms": 1000 * statistics.median(transfers),
        "ttft_ms": 1000 * statistics.median(ttfts),
        "share": statistics.median(shares),
        "transports": sorted({s.transport for s in log.stats}),
    }


async def bench_in_process(engine: EngineConfig, blocks: list[int], reps: int, warmup: int):
    """Two workers in this process sharing one loaded model."""
    first = await LocalExecutor.start(engine)
    second = LocalExecutor(Worker(engine, None, first.worker.loaded))
    return {n: await transfer_seconds(first, second, n, reps, warmup) for n in blocks}


async def bench_ray(
    engine: EngineConfig, transport: str, blocks: list[int], args: argparse.Namespace
) -> tuple[dict[int, tuple[float, int, str]], dict]:
    log = MigrationLog()
    controller = Controller(
        engine, PlacementConfig(mode="disagg"), observer=log, transport=transport
    )
    await controller.start()
    try:
        prefill, decode = (i.executor for i in controller.instances)
        bw = {n: await transfer_seconds(prefill, decode, n, args.reps, args.warmup) for n in blocks}
        share = await ttft_share(controller, log, args.requests, PROMPT_TOKENS[0])
        return bw, share
    finally:
        await controller.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer repetitions and requests (a smoke run)"
    )
    ap.add_argument(
        "--reps", type=int, default=None, help="timed transfers per size (default: 20, quick 5)"
    )
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed transfers before each size (default: 3)"
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=None,
        help="timed 512-token requests per transport for the TTFT share (default: 10, quick 3)",
    )
    ap.add_argument(
        "--transports",
        default=",".join(("in-process", *RAY_TRANSPORTS)),
        help="comma-separated transports to measure (default: all: in-process,"
        + ",".join(RAY_TRANSPORTS)
        + ")",
    )
    ap.add_argument(
        "--output",
        default="benchmarks/results/migration.json",
        help="where to write the JSON results (default: benchmarks/results/migration.json)",
    )
    args = ap.parse_args()
    args.reps = args.reps or (5 if args.quick else 20)
    args.requests = args.requests or (3 if args.quick else 10)
    transports = [t for t in args.transports.split(",") if t]
    unknown = set(transports) - {"in-process", *RAY_TRANSPORTS}
    if unknown or not transports:
        ap.error(f"--transports: name some of in-process,{','.join(RAY_TRANSPORTS)}")
    engine = EngineConfig(cache=CacheConfig(num_blocks=256))
    results = asyncio.run(run(engine, transports, args))
    print_tables(results, args)
    out = {
        "config": engine.to_dict()
        | {"reps": args.reps, "warmup": args.warmup, "requests": args.requests},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        **results,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


async def run(engine: EngineConfig, transports: list[str], args: argparse.Namespace) -> dict:
    bs = engine.cache.block_size
    blocks = [n // bs for n in PROMPT_TOKENS]
    bandwidth: dict[str, dict[str, dict[str, Any]]] = {}
    shares: dict[str, dict] = {}
    for transport in transports:
        print(f"measuring {transport} ...", file=sys.stderr, flush=True)
        if transport == "in-process":
            bw = await bench_in_process(engine, blocks, args.reps, args.warmup)
        else:
            bw, shares[transport] = await bench_ray(engine, transport, blocks, args)
        bandwidth[transport] = {
            str(tokens): _row(*bw[n]) for tokens, n in zip(PROMPT_TOKENS, blocks, strict=True)
        }
    sizes = next(iter(bandwidth.values()))  # every transport moved the same bytes
    memcpy = {
        tokens: _row(memcpy_seconds(r["bytes"], args.reps, args.warmup), r["bytes"], "memcpy")
        for tokens, r in sizes.items()
    }
    return {"memcpy": memcpy, "bandwidth": bandwidth, "ttft_share": shares}


def _row(seconds: float, num_bytes: int, transport: str) -> dict[str, Any]:
    return {
        "bytes": num_bytes,
        "ms": 1000 * seconds,
        "gb_per_s": num_bytes / seconds / 1e9,
        "transport": transport,
    }


def print_tables(results: dict, args: argparse.Namespace) -> None:
    memcpy, bandwidth = results["memcpy"], results["bandwidth"]
    sizes = list(memcpy)
    head = "".join(f" | {s + ' tok (' + _mb(memcpy[s]['bytes']) + ')':>30s}" for s in sizes)
    print(f"\nKV transfer, median of {args.reps} after {args.warmup} warm-up (GB = 1e9 B)")
    print(f"{'transport':14s}{head}")
    print(f"{'':14s}" + " | {:>8s} {:>9s} {:>10s}".format("ms", "GB/s", "of memcpy") * len(sizes))
    for name, rows in [("memcpy", memcpy), *bandwidth.items()]:
        cells = ""
        for s in sizes:
            r = rows[s]
            ratio = r["gb_per_s"] / memcpy[s]["gb_per_s"]
            cells += f" | {r['ms']:8.2f} {r['gb_per_s']:9.2f} {100 * ratio:9.1f}%"
        print(f"{name:14s}{cells}")
    shares = results["ttft_share"]
    if shares:
        tokens = next(iter(shares.values()))["prompt_tokens"]
        print(
            f"\nMigration share of TTFT: 1P1D Ray actors, {tokens}-token prompts one at a time, "
            f"median of {args.requests}"
        )
        print(
            f"{'transport':14s} {'migration ms':>12s} {'transfer ms':>12s} {'TTFT ms':>9s} "
            f"{'share':>7s}"
        )
        for name, r in shares.items():
            print(
                f"{name:14s} {r['migration_ms']:12.2f} {r['transfer_ms']:12.2f} "
                f"{r['ttft_ms']:9.1f} {100 * r['share']:6.2f}%"
            )


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
