"""What a prefix read back from the KV store's disk tier (serve --kv-store-disk-gb) costs,
against recomputing it and against reading it from the store's memory, on one core.

    python benchmarks/kv_store_disk.py [--rounds 5] [--lengths 512 2048] [--dir DIR]
        [--output benchmarks/results/kv_store_disk.json]

SmolLM2 (bf16) in one worker of this process, pinned to core 0 (benchmarks/kv_store.py's
setup); the spill file is runtime/kv_store.py's SpillFile under DIR (default: the
temporary directory). For a prefix of N tokens (N / 16 blocks):

  recompute  a prefill of N tokens (what a prompt pays without the prefix cached)
  memory     its blocks copied from the store's pool into the cache (a store hit)
  disk       its blocks read from the spill file into the pool, then copied into the
             cache (a hit on disk: what `prefix_blocks` and the step's load do), with
             the file's pages in the page cache (read soon after they were spilled)
  disk cold  the same after fsync + POSIX_FADV_DONTNEED dropped the file's pages (on a
             VM the host may still cache the virtual disk)
  spill      the blocks written from the pool to the spill file (what evicting them
             costs the controller's loop, which makes the writes)

Rounds interleave the variants, order reversed every round; medians and min-max printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_store import machine, setup, summary  # noqa: E402

from distserve.runtime.kv_store import SpillFile  # noqa: E402

Case = tuple[Callable[[], Any], Callable[[], Any]]
"""(untimed preparation, timed work)."""


def interleaved(cases: dict[str, Case], rounds: int) -> dict[str, dict[str, float]]:
    names = list(cases)
    for name in names:  # warm-up
        prep, work = cases[name]
        prep()
        work()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            prep, work = cases[name]
            prep()
            t0 = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - t0)
    return {n: summary(t) for n, t in times.items()}


def main(args: argparse.Namespace) -> dict[str, Any]:
    engine, worker, pool, plans = setup()
    bs = worker.cache.block_size
    most = max(args.lengths) // bs
    spill = SpillFile(pool, most * pool.bytes_per_slot / 2**30, args.dir)
    assert spill.fd is not None
    fd = spill.fd

    def spill_all(n: int) -> None:
        for i in range(n):
            spill.write(i, i)

    def read_back(n: int, blocks: list[int]) -> None:
        for i in range(n):
            spill.read(i, i)
        worker.cache.copy_from(pool.blocks, list(range(n)), blocks)

    def drop_pages() -> None:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def nothing() -> None:
        pass

    spill_all(most)
    cases: dict[str, Case] = {}
    for n_tokens in args.lengths:
        p = plans.prefill(n_tokens, 1)
        n = n_tokens // bs
        blocks = list(p.chunks[0].block_table)[:n]
        cases[f"recompute {n_tokens}"] = (nothing, lambda p=p: worker.execute(p))
        cases[f"memory {n_tokens}"] = (
            nothing, lambda n=n, b=blocks: worker.cache.copy_from(pool.blocks, list(range(n)), b)
        )  # fmt: skip
        cases[f"disk {n_tokens}"] = (nothing, lambda n=n, b=blocks: read_back(n, b))
        cases[f"disk cold {n_tokens}"] = (drop_pages, lambda n=n, b=blocks: read_back(n, b))
        cases[f"spill {n_tokens}"] = (nothing, lambda n=n: spill_all(n))
    result = interleaved(cases, args.rounds)
    spill.close()
    for name, s in result.items():
        print(f"{name:>16}: {s['median_ms']:8.2f} ms  [{s['min_ms']:.2f}-{s['max_ms']:.2f}]")
    for n in args.lengths:
        med = {k: result[f"{k} {n}"]["median_ms"] for k in ("recompute", "disk", "disk cold")}
        print(f"{n} tokens from disk: {med['recompute'] / med['disk']:.0f}x faster than "
              f"recomputing them ({med['recompute'] / med['disk cold']:.0f}x cold)")  # fmt: skip
    return {
        "config": {**vars(args), "model": engine.model, "dtype": engine.dtype, "cores": [0]},
        "machine": machine(),
        "kv_bytes_per_token": pool.bytes_per_slot // bs,
        "results": result,
        "speedup_over_recompute": {
            n: result[f"recompute {n}"]["median_ms"] / result[f"disk {n}"]["median_ms"]
            for n in args.lengths
        },
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="measurement rounds")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048],
                   help="prefix lengths in tokens")  # fmt: skip
    p.add_argument("--dir", default=None, help="directory of the spill file")
    p.add_argument("--output", default="benchmarks/results/kv_store_disk.json",
                   help="JSON output")  # fmt: skip
    a = p.parse_args()
    out = main(a)
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.output}")
