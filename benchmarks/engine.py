"""Engine throughput on this machine: our engine vs HF transformers, same model, dtype
and threads, in one run.

    python benchmarks/engine.py [--quick] [--output benchmarks/results/engine.json]

Prefill: tokens/s of one prompt of 128..2048 tokens (time to the first token).
Decode: tokens/s at batch 1..64 with ~512 tokens of context per request (steady state,
prefill excluded). HF runs `generate` (its own KV cache, greedy) on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from distserve.config import EngineConfig
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.runtime.engine import LLMEngine

CONTEXT = 512


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def ours_prefill(eng: LLMEngine, length: int, reps: int) -> float:
    times = []
    for r in range(reps + 1):
        eng.add_request(_prompt(length, r), SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        times.append(time.perf_counter() - t)
    return length / min(times[1:])  # first run is warm-up


def ours_decode(eng: LLMEngine, batch: int, steps: int) -> float:
    for i in range(batch):
        eng.add_request(
            _prompt(CONTEXT, i),
            SamplingParams(temperature=0, max_tokens=steps + 3, ignore_eos=True),
        )
    while any(r.num_output_tokens < 2 for r in eng.scheduler.requests.values()):
        eng.step()  # prefills and the first decode step (warm-up)
    t = time.perf_counter()
    n = 0
    while eng.has_unfinished():
        n += len(eng.step())
    return n / (time.perf_counter() - t)


def hf_model(eng: LLMEngine) -> torch.nn.Module:
    """HF's Llama with exactly our weights (the GGUF's, as HF names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distserve.model.gguf_file import GGUFModelFile
    from distserve.model.registry import resolve

    c = eng.loaded.config
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_word_embeddings,
        )  # fmt: skip
    )
    path = resolve(eng.config.model).path
    assert path is not None
    missing, _ = hf.load_state_dict(dict(GGUFModelFile(path).weights()), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing
    hf.tie_weights()
    return hf.to(torch.bfloat16).eval()


@torch.inference_mode()
def hf_prefill(model: torch.nn.Module, length: int, reps: int) -> float:
    times = []
    for r in range(reps + 1):
        ids = torch.tensor([_prompt(length, r)])
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t)
    return length / min(times[1:])


@torch.inference_mode()
def hf_decode(model: torch.nn.Module, batch: int, steps: int) -> float:
    ids = torch.tensor([_prompt(CONTEXT, i) for i in range(batch)])
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
    t2 = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=steps + 2, min_new_tokens=steps + 2, **kw)
    return batch * steps / (time.perf_counter() - t - t2)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer sizes and steps (a smoke run)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument(
        "--output", default="benchmarks/results/engine.json", help="where to write the JSON results"
    )
    args = ap.parse_args()
    lengths = [128, 512] if args.quick else [128, 256, 512, 1024, 2048]
    batches = [1, 8] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    steps = 8 if args.quick else 32
    config = EngineConfig(
        cache=CacheConfig(kv_cache_gb=2.0),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=2048),
    )
    eng = LLMEngine(config)
    threads = torch.get_num_threads()
    rows: dict[str, dict[str, dict[int, float]]] = {
        "ours": {"prefill": {}, "decode": {}},
        "hf": {"prefill": {}, "decode": {}},
    }
    hf = None if args.no_hf else hf_model(eng)
    for n in lengths:
        rows["ours"]["prefill"][n] = ours_prefill(eng, n, reps=2)
        if hf is not None:
            rows["hf"]["prefill"][n] = hf_prefill(hf, n, reps=2)
        _print_row("prefill", n, rows)
    for b in batches:
        rows["ours"]["decode"][b] = ours_decode(eng, b, steps)
        if hf is not None:
            rows["hf"]["decode"][b] = hf_decode(hf, b, steps)
        _print_row("decode", b, rows)
    ours, base = rows["ours"]["decode"], rows["hf"]["decode"]
    summary = {}
    if base.get(1) and 32 in ours:
        summary["ours_decode_b32_over_hf_b1"] = ours[32] / base[1]
    if base.get(1) and 1 in ours:
        summary["ours_b1_step_ms"] = 1000 / ours[1]
        summary["hf_b1_step_ms"] = 1000 / base[1]
    print(json.dumps(summary, indent=1))
    out = {
        "config": config.to_dict()
        | {"threads": threads, "context": CONTEXT, "decode_steps": steps},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "tokens_per_s": rows,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _print_row(kind: str, size: int, rows: dict[str, dict[str, dict[int, float]]]) -> None:
    ours = rows["ours"][kind][size]
    hf = rows["hf"][kind].get(size)
    label = "prompt" if kind == "prefill" else "batch"
    extra = f"  hf {hf:8.1f} tok/s  ratio {ours / hf:5.2f}x" if hf else ""
    print(f"{kind:8s} {label} {size:5d}: ours {ours:8.1f} tok/s{extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
