"""Prefix caching's saving on this machine: the time to first token of a long prompt
computed cold, served from the cache when repeated, and when only its prefix is shared.

    python benchmarks/prefix_cache.py [--prompt-len 1000] [--reps 5] [--core 0]
        [--dtype bfloat16] [--output benchmarks/results/prefix_cache.json]

SmolLM2 in one engine pinned to one core. Each rep draws a fresh random prompt of
`--prompt-len` tokens (so no rep hits another's blocks) and measures, one request at a
time, `max_tokens=1` (the TTFT is the whole request):
  cold       the prompt, first seen (prefix caching on: nothing cached yet)
  repeated   the same prompt again (every full block but the last is cached)
  shared     the prompt's first full blocks plus a new 32-token question
  off        the prompt on a second engine with --no-prefix-caching (the old engine)
and records the median of each, the cached tokens each reported, and whether the
repeated prompt's greedy token equals the cold one. The KV cache has room for every rep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams
from distserve.runtime.engine import LLMEngine, RequestOutput


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def ttft(eng: LLMEngine, prompt: list[int]) -> tuple[float, RequestOutput]:
    """Seconds from submitting the prompt to its first (and only) token."""
    params = SamplingParams(temperature=0, max_tokens=1)
    t0 = time.perf_counter()
    eng.add_request(prompt, params)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            out = o
    assert out is not None and out.finished
    return time.perf_counter() - t0, out


def engine(args: argparse.Namespace, caching: bool) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            dtype=args.dtype,
            cores=(args.core,),
            cache=CacheConfig(num_blocks=64 * (args.reps + 2) * 2, prefix_caching=caching),
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--output", default="benchmarks/results/prefix_cache.json")
    args = p.parse_args()
    warm, off = engine(args, True), engine(args, False)
    ttft(warm, _prompt(args.prompt_len, 10_000))  # first calls build and load kernels
    ttft(off, _prompt(args.prompt_len, 10_001))
    times: dict[str, list[float]] = {k: [] for k in ("cold", "repeated", "shared", "off")}
    cached: dict[str, list[int]] = {k: [] for k in times}
    same_token = []
    for rep in range(args.reps):
        prompt = _prompt(args.prompt_len, rep)
        question = _prompt(32, 1_000 + rep)
        runs = {
            "cold": (warm, prompt),
            "repeated": (warm, prompt),
            "shared": (warm, prompt[: 16 * (args.prompt_len // 16)] + question),
            "off": (off, prompt),
        }
        outs = {}
        for name, (eng, ids) in runs.items():
            t, out = ttft(eng, ids)
            times[name].append(t)
            cached[name].append(out.num_cached_tokens)
            outs[name] = out
        same_token.append(outs["repeated"].token_ids == outs["cold"].token_ids)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "core": args.core},
        "model": "smollm2-135m",
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "reps": args.reps,
        "ttft_ms_median": {k: round(v * 1e3, 2) for k, v in med.items()},
        "ttft_ms_all": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
        "cached_tokens": {k: v[0] for k, v in cached.items()},
        "speedup_repeated_vs_cold": round(med["cold"] / med["repeated"], 2),
        "speedup_shared_vs_cold": round(med["cold"] / med["shared"], 2),
        "cold_vs_off": round(med["cold"] / med["off"], 3),
        "repeated_first_token_equals_cold": all(same_token),
    }
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
