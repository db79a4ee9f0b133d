"""What the KV store (serve --kv-store-gb) costs and what it saves, on one core.

    python benchmarks/kv_store.py [--rounds 7] [--output benchmarks/results/kv_store.json]
    python benchmarks/kv_store.py --layerwise [--rounds 7] [--lengths 512 1024 2048]
        [--output benchmarks/results/kv_store_layerwise.json]

SmolLM2 (bf16) in one worker of this process, pinned to core 0, as a Ray worker runs it;
the store is the same pool a server maps (runtime/kv_store.py), in this process's memory
(a Ray worker maps a /dev/shm file: the same copies).

  write-through  a 512-token prefill (batch 1) and a decode step of 8 sequences at 512
                 tokens, each with and without its store writes (the prompt's 32 blocks;
                 one token per sequence): the cost every step pays with a store
  resume         a dead decode instance's request of N tokens read back from the store
                 (the copy a replacement makes) against its recompute (a prefill of N
                 tokens, what happens without a store), N = 512, 1024, 2048

With --layerwise instead, a prefill of N tokens (batch 1) that writes its blocks to the
store, N = 512, 1024, 2048:

  none       no store writes (what the writes cost)
  after      every layer's KV copied after the forward (`ModelRunner.layerwise_store`
             False, as before)
  layerwise  each layer's rows copied as that layer finishes, inline in the forward's
             thread (the runner's default since issue 22)
  thread     each layer's rows copied by a background thread as that layer finishes
             (as runtime/worker/layerwise.py's sender does), waited for at the step's end

The thread is pinned to the worker's core like every thread of the process: on one core
the copies and the compute share it, so layer by layer saves at most cache misses.

Rounds interleave the variants, order reversed every round; medians and min-max printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, StepPlan
from distserve.model.loader import DTYPES
from distserve.runtime.kv_store import StorePool, write_to_store
from distserve.runtime.worker.layerwise import layer_rows
from distserve.runtime.worker.synthetic import SyntheticPlans
from distserve.runtime.worker.worker import Worker


def with_writes(plan: StepPlan, block_size: int) -> StepPlan:
    """The plan's store writes, as core/kv_store.py adds them (fresh slots)."""
    writes, slot = [], 0
    for c in plan.chunks:
        for i in range(c.start // block_size, (c.context_len - 1) // block_size + 1):
            first = max(c.start, i * block_size) - i * block_size
            end = min(c.context_len, (i + 1) * block_size) - i * block_size
            writes.append((c.block_table[i], slot, first, end))
            slot += 1
    return dataclasses.replace(plan, store_writes=tuple(writes))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3,
            "max_ms": max(xs) * 1e3}  # fmt: skip


def interleaved(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Each case once to warm up, then `rounds` rounds, order reversed every round."""
    names = list(cases)
    for name in names:  # warm-up
        cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(cases[name]))
    return {n: summary(t) for n, t in times.items()}


def setup() -> tuple[EngineConfig, Worker, StorePool, SyntheticPlans]:
    engine = EngineConfig(dtype="bfloat16", cache=CacheConfig(num_blocks=1024))
    worker = Worker(engine, [0])
    info = worker.info()
    pool = StorePool(info.model_config, 0.25, info.block_size, DTYPES[engine.dtype], shared=False)
    worker.use_store(pool.blocks)
    return engine, worker, pool, SyntheticPlans(info.num_blocks, info.block_size,
                                                info.model_config.vocab_size)  # fmt: skip


class ThreadedWrites:
    """The alternative to the runner's inline copies: a background thread copies each
    layer's rows of a step's store writes once the forward reports the layer done."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.writes: tuple[tuple[int, int, int, int], ...] = ()
        self.jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.ended = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def step(self, plan: StepPlan, writes: tuple[tuple[int, int, int, int], ...]) -> None:
        runner = self.worker.runner
        self.writes, runner.on_layer = writes, self.jobs.put
        try:
            self.worker.execute(plan)
        finally:
            runner.on_layer = None
            self.jobs.put(-1)
            self.ended.wait()
            self.ended.clear()

    def _run(self) -> None:
        cache, store = self.worker.cache, self.worker.runner.store
        assert store is not None
        rows = layer_rows(cache)
        while True:
            i = self.jobs.get()
            if i < 0:
                self.ended.set()
                continue
            write_to_store(cache.blocks, store, self.writes, cache.block_size,
                           slice(i * rows, (i + 1) * rows))  # fmt: skip


def main_layerwise(args: argparse.Namespace) -> dict[str, Any]:
    engine, worker, pool, plans = setup()
    bs, runner = worker.cache.block_size, worker.runner
    threaded = ThreadedWrites(worker)

    def run(plan: StepPlan, layerwise: bool) -> None:
        runner.layerwise_store = layerwise
        worker.execute(plan)
        runner.layerwise_store = True

    cases: dict[str, Callable[[], Any]] = {}
    for n in args.lengths:
        plain = plans.prefill(n, 1)
        writing = with_writes(plain, bs)
        cases[f"none {n}"] = lambda p=plain: worker.execute(p)
        cases[f"after {n}"] = lambda p=writing: run(p, False)
        cases[f"layerwise {n}"] = lambda p=writing: run(p, True)
        cases[f"thread {n}"] = lambda p=plain, w=writing.store_writes: threaded.step(p, w)
    result = interleaved(cases, args.rounds)
    for name, s in result.items():
        print(f"{name:>15}: {s['median_ms']:8.2f} ms  [{s['min_ms']:.2f}-{s['max_ms']:.2f}]")
    saving = {}
    for n in args.lengths:
        after = result[f"after {n}"]["median_ms"]
        saving[n] = {v: after - result[f"{v} {n}"]["median_ms"] for v in ("layerwise", "thread")}
        cost = after - result[f"none {n}"]["median_ms"]
        print(f"{n} tokens: layer by layer saves {saving[n]['layerwise']:+.2f} ms inline, "
              f"{saving[n]['thread']:+.2f} ms from a thread (medians, against after the "
              f"forward; the writes cost {cost:+.2f} ms)")  # fmt: skip
    return {
        "config": {**vars(args), "model": engine.model, "dtype": engine.dtype, "cores": [0]},
        "machine": machine(),
        "kv_bytes_per_token": pool.bytes_per_slot // bs,
        "results": result,
        "saving_ms": saving,
    }


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__}  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    engine, worker, pool, plans = setup()
    bs = worker.cache.block_size
    prefill = plans.prefill(args.prompt_len, 1)
    decode = plans.decode(args.decode_batch, args.context)
    cases: dict[str, Callable[[], Any]] = {
        "prefill": lambda: worker.execute(prefill),
        "prefill + store": lambda: worker.execute(with_writes(prefill, bs)),
        "decode": lambda: worker.execute(decode),
        "decode + store": lambda: worker.execute(with_writes(decode, bs)),
    }
    for n in args.resume_tokens:
        p = plans.prefill(n, 1)
        blocks = list(p.chunks[0].block_table)
        slots = list(range(len(blocks)))
        cases[f"recompute {n}"] = lambda p=p: worker.execute(p)
        cases[f"resume {n}"] = lambda s=slots, b=blocks: worker.cache.copy_from(pool.blocks, s, b)
    result = interleaved(cases, args.rounds)
    for n, s in result.items():
        print(f"{n:>18}: {s['median_ms']:8.2f} ms  [{s['min_ms']:.2f}-{s['max_ms']:.2f}]")
    overhead = {
        k: result[f"{k} + store"]["median_ms"] - result[k]["median_ms"]
        for k in ("prefill", "decode")
    }
    per_token = pool.bytes_per_slot // bs
    print(f"write-through cost: prefill {overhead['prefill']:+.2f} ms, decode step "
          f"{overhead['decode']:+.2f} ms ({per_token} bytes of KV a token)")  # fmt: skip
    for n in args.resume_tokens:
        saved = result[f"recompute {n}"]["median_ms"] / result[f"resume {n}"]["median_ms"]
        print(f"resume of {n} tokens: {saved:.0f}x faster than their recompute")
    return {
        "config": {**vars(args), "model": engine.model, "dtype": engine.dtype},
        "machine": machine(),
        "kv_bytes_per_token": per_token,
        "results": result,
        "write_through_ms": overhead,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="measurement rounds")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    p.add_argument("--decode-batch", type=int, default=8, help="sequences in the decode step")
    p.add_argument("--context", type=int, default=512, help="tokens of KV per decode sequence")
    p.add_argument("--resume-tokens", type=int, nargs="+", default=[512, 1024, 2048],
                   help="request lengths to resume or recompute")  # fmt: skip
    p.add_argument("--layerwise", action="store_true",
                   help="time store writes after the forward against layer by layer")  # fmt: skip
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048],
                   help="--layerwise: prompt lengths")  # fmt: skip
    p.add_argument("--output", help="JSON output (default benchmarks/results/kv_store.json, "
                   "with --layerwise kv_store_layerwise.json)")  # fmt: skip
    a = p.parse_args()
    a.output = a.output or ("benchmarks/results/kv_store_layerwise.json" if a.layerwise
                            else "benchmarks/results/kv_store.json")  # fmt: skip
    out = main_layerwise(a) if a.layerwise else main(a)
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.output}")
