"""What reaching the KV store (serve --kv-store-gb) from another Ray node costs: a worker
whose store traffic is relayed through the controller's process against one that maps it.

    python benchmarks/kv_store_relay.py [--rounds 7] [--lengths 512 1024 2048] [--dtype auto]
        [--output benchmarks/results/kv_store_relay.json]

A Ray cluster of two nodes on this machine (ray.cluster_utils, as tests/e2e/multinode_run.py
makes one): the head, which this process (the controller's side) joins, and one more node,
each with one CPU, so one SmolLM2 worker (`--dtype`) lands on each, both pinned to core 0.
The store is a StorePool of this process in /dev/shm: the worker on the head maps it
(RayExecutor.attach_store), the other reaches it through this process
(RayExecutor.relay_store, runtime/kv_store.py StoreRelay), as cluster/store_link.py
decides. For a prompt of N tokens (batch 1, N / 16 blocks):

  none      a prefill step on the head's worker without store writes (what a step costs
            without a store)
  mapped    the same step writing its blocks to the store, on the head's worker: the
            writes go layer by layer into the mapped pool
  relayed   the same step on the other node's worker: its written KV comes back packed
            with the result through Ray's object store and this process copies it into
            the pool (`execute_relayed`, `gather_writes`, `scatter_writes`)
  pull mapped / pull relayed
            N tokens of the store copied into the worker's cache (`pull_from_store`, what a
            resumed request's new decode instance does): a copy from the mapped pool, or
            the slots read out here and sent as `write_blocks`

Each is timed from this process's event loop (what the controller's loop waits), so the
relayed variants include the object-store transfers and the copies in this process.
Rounds interleave the variants, order reversed every round; medians and min-max printed,
with the bytes one call relays (StoreRelay.num_bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_store import machine, summary, with_writes  # noqa: E402

from distserve.config import EngineConfig  # noqa: E402
from distserve.core import CacheConfig  # noqa: E402
from distserve.model.loader import DTYPES  # noqa: E402
from distserve.runtime.executor import RayExecutor  # noqa: E402
from distserve.runtime.kv_store import StorePool  # noqa: E402
from distserve.runtime.worker.synthetic import SyntheticPlans  # noqa: E402

Case = Callable[[], Awaitable[Any]]


async def interleaved(
    cases: dict[str, Case], rounds: int, relayed: Callable[[], int]
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Each case once to warm up (counting the bytes it relays), then `rounds` rounds,
    order reversed every round."""
    names = list(cases)
    relayed_bytes = {}
    for name in names:
        before = relayed()
        await cases[name]()
        relayed_bytes[name] = relayed() - before
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            await cases[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: summary(t) for n, t in times.items()}, relayed_bytes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    engine = EngineConfig(dtype=args.dtype, cache=CacheConfig(num_blocks=1024))
    workers = await asyncio.gather(*(RayExecutor.start(engine, [0], f"w{i}") for i in range(2)))
    infos = await asyncio.gather(*(w.info() for w in workers))
    here = ray.get_runtime_context().get_node_id()
    if sorted(i.node == here for i in infos) != [False, True]:
        raise RuntimeError(f"expected one worker on this node, one on another: {infos}")
    mapped, relayed = workers if infos[0].node == here else workers[::-1]
    info = infos[0]
    bs = info.block_size
    pool = StorePool(info.model_config, args.store_gb, bs, DTYPES[engine.dtype], shared=True)
    try:
        await mapped.attach_store(pool)
        relayed.relay_store(pool)
        assert relayed.relay is not None
        plans = SyntheticPlans(info.num_blocks, bs, info.model_config.vocab_size)
        cases: dict[str, Case] = {}
        for n in args.lengths:
            plain = plans.prefill(n, 1)
            writing = with_writes(plain, bs)
            blocks = list(plain.chunks[0].block_table)[: n // bs]
            slots = list(range(len(blocks)))
            cases[f"none {n}"] = lambda p=plain: mapped.execute(p)
            cases[f"mapped {n}"] = lambda p=writing: mapped.execute(p)
            cases[f"relayed {n}"] = lambda p=writing: relayed.execute(p)
            cases[f"pull mapped {n}"] = lambda s=slots, b=blocks: mapped.pull_from_store(s, b)
            cases[f"pull relayed {n}"] = lambda s=slots, b=blocks: relayed.pull_from_store(s, b)
        relay = relayed.relay
        result, nbytes = await interleaved(cases, args.rounds, lambda: relay.num_bytes)
    finally:
        pool.close()
    for name, s in result.items():
        print(f"{name:>18}: {s['median_ms']:8.2f} ms  [{s['min_ms']:.2f}-{s['max_ms']:.2f}]"
              f"  {nbytes[name] / 2**20:6.1f} MiB relayed")  # fmt: skip
    cost = {}
    for n in args.lengths:
        med = {k: result[f"{k} {n}"]["median_ms"] for k in ("none", "mapped", "relayed")}
        pulls = [result[f"pull {k} {n}"]["median_ms"] for k in ("mapped", "relayed")]
        cost[n] = {"mapped_writes_ms": med["mapped"] - med["none"],
                   "relayed_writes_ms": med["relayed"] - med["none"],
                   "relayed_pull_extra_ms": pulls[1] - pulls[0]}  # fmt: skip
        print(f"{n} tokens: store writes cost {cost[n]['mapped_writes_ms']:+.2f} ms mapped, "
              f"{cost[n]['relayed_writes_ms']:+.2f} ms relayed; a pull relayed "
              f"{cost[n]['relayed_pull_extra_ms']:+.2f} ms more than mapped (medians)")  # fmt: skip
    return {
        "config": {**vars(args), "model": engine.model, "dtype": engine.dtype, "cores": [0]},
        "machine": machine(),
        "kv_bytes_per_token": pool.bytes_per_slot // bs,
        "results": result,
        "relayed_bytes_per_call": nbytes,
        "cost_ms": cost,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        return asyncio.run(run(args))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="measurement rounds")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048],
                   help="prompt lengths in tokens (multiples of the block size, 16)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the workers' dtype (auto: bf16 if the CPU has it natively)")  # fmt: skip
    p.add_argument("--store-gb", type=float, default=0.25, help="GiB of the KV store's pool")
    p.add_argument("--output", default="benchmarks/results/kv_store_relay.json",
                   help="JSON output")  # fmt: skip
    a = p.parse_args()
    out = main(a)
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.output}")
