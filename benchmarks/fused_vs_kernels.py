"""The compiled fused decode layer against the per-kernel path, on one engine.

    python benchmarks/fused_vs_kernels.py

Both paths decode the same requests (~512 tokens of context each), alternating in blocks
of steps so that drift in the machine's speed falls on both alike; median step time per
batch size and thread count. Writes benchmarks/results/fused_vs_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.runtime.engine import LLMEngine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import CONTEXT, _prompt  # noqa: E402

ROUNDS, BLOCK = 6, 8


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", default="1,16,64", help="batch sizes (default: 1,16,64)")
    ap.add_argument(
        "--output", default="benchmarks/results/fused_vs_kernels.json", help="results JSON"
    )
    args = ap.parse_args()
    eng = LLMEngine(
        EngineConfig(
            cache=CacheConfig(kv_cache_gb=2.0),
            scheduler=SchedulerConfig(
                max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=2048
            ),
        )
    )
    layers = list(eng.loaded.model.layers)
    saved = [layer.fused for layer in layers]
    if saved[0] is None:
        print("the fused layer is unavailable (kernels not built): nothing to compare")
        return 1
    threads = sorted({1, torch.get_num_threads()})
    steps_needed = len(threads) * ROUNDS * 2 * (BLOCK + 1) + 4
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for i in range(batch):
            eng.add_request(
                _prompt(CONTEXT, i),
                SamplingParams(temperature=0, max_tokens=steps_needed, ignore_eos=True),
            )
        while any(r.num_output_tokens < 2 for r in eng.scheduler.requests.values()):
            eng.step()
        for t in threads:
            torch.set_num_threads(t)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(ROUNDS):
                for fused in (True, False):
                    for layer, f in zip(layers, saved, strict=True):
                        layer.fused = f if fused else None
                    eng.step()  # the first step after a switch is not timed
                    for _ in range(BLOCK):
                        t0 = time.perf_counter()
                        eng.step()
                        times[fused].append(time.perf_counter() - t0)
            row = {
                "batch": batch,
                "threads": t,
                "fused_ms": 1000 * statistics.median(times[True]),
                "per_kernel_ms": 1000 * statistics.median(times[False]),
            }
            rows.append(row)
            print(
                f"batch {batch:3d}, {t} thread(s): fused {row['fused_ms']:.2f} ms, "
                f"per-kernel {row['per_kernel_ms']:.2f} ms",
                flush=True,
            )
        for rid in list(eng.scheduler.requests):
            eng.abort(rid)
        while eng.has_unfinished():
            eng.step()
    for layer, f in zip(layers, saved, strict=True):
        layer.fused = f
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"context": CONTEXT, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
