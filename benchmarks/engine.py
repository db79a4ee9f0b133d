"""Engine speed on this machine: our engine vs HF transformers (same model, dtype and
threads) vs the machine's limits, all measured in one run.

    python benchmarks/engine.py [--quick] [--no-hf] [--output benchmarks/results/engine.json]

Limits: memory read bandwidth (sum over a 1 GiB tensor) and the bf16 matmul peak through
torch (2048^3), on 1 and 2 threads; from them, the floor of a batch-1 decode step (every
weight read once), of one more sequence in a decode batch on one core (its FLOPs at the
matmul peak plus its KV read at the 1-core bandwidth), and the prefill ceiling per core.
Prefill: tokens/s of one prompt (time to the first token). Decode: median step time at
batch 1..64 with ~512 tokens of context per request, prefill excluded. The marginal cost of
a sequence is (step(64) - step(1)) / 63 on one thread. HF runs `generate` (greedy, its own
KV cache) on the same weights.
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
from distserve.core import CacheConfig, SamplingParams, SchedulerConfig
from distserve.runtime.engine import LLMEngine
from distserve.timing import best_time

CONTEXT = 512


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def machine_limits(threads: list[int]) -> dict[str, dict[int, float]]:
    """Memory read bandwidth (GB/s) and torch's bf16 matmul peak (GFLOP/s) per thread count."""
    x = torch.ones(2**28)  # 1 GiB, touched once
    a = torch.randn(2048, 2048).to(torch.bfloat16)
    b = torch.randn(2048, 2048).to(torch.bfloat16)
    out: dict[str, dict[int, float]] = {"read_gb_s": {}, "bf16_gflop_s": {}}
    for t in threads:
        torch.set_num_threads(t)
        out["read_gb_s"][t] = x.numel() * 4 / best_time(x.sum, 5) / 1e9
        out["bf16_gflop_s"][t] = 2 * 2048**3 / best_time(lambda: a @ b, 5) / 1e9
    del x
    return out


def model_floors(cfg: Any, limits: dict[str, dict[int, float]]) -> dict[str, float]:
    """What the limits allow for this model in bf16 (see the module docstring)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    emb = cfg.vocab_size * h
    body = cfg.num_params - emb  # per-token matmul weights, without the embedding table
    weight_bytes = 2 * (body + emb)  # the tied embedding is read again as the LM head
    kv_bytes = cfg.kv_bytes_per_token(2) * CONTEXT
    attn_flops = 4 * layers * cfg.num_heads * cfg.head_dim  # per (token, context position)
    seq_flops = 2 * (body + emb) + attn_flops * CONTEXT
    prefill_flops = 2 * body + attn_flops * (CONTEXT + 1) / 2
    bw, peak = limits["read_gb_s"], limits["bf16_gflop_s"]
    return {
        "decode_b1_step_ms": 1e3 * weight_bytes / (bw[max(bw)] * 1e9),
        "marginal_ms_per_seq_1core": 1e3 * (seq_flops / (peak[1] * 1e9) + kv_bytes / (bw[1] * 1e9)),
        "prefill_tok_s_per_core": peak[1] * 1e9 / prefill_flops,
    }


def ours_prefill(eng: LLMEngine, length: int, reps: int) -> float:
    times = []
    for r in range(reps + 1):
        eng.add_request(_prompt(length, r), SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        times.append(time.perf_counter() - t)
    return length / min(times[1:])  # first run is warm-up


def ours_decode(
    eng: LLMEngine, batch: int, steps: int, threads: list[int], timed: Any = None
) -> dict[int, float]:
    """Median decode step time (s) of `batch` requests at ~CONTEXT tokens, per thread count
    (the same requests go on decoding under each count in turn). `timed`: counters to reset
    once the measured steps begin."""
    for i in range(batch):
        eng.add_request(
            _prompt(CONTEXT, i),
            SamplingParams(temperature=0, max_tokens=len(threads) * steps + 3, ignore_eos=True),
        )
    while any(r.num_output_tokens < 2 for r in eng.scheduler.requests.values()):
        eng.step()  # prefills and the first decode step (warm-up)
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        eng.step()
        if timed is not None:
            timed.active = True
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
        out[t] = statistics.median(times)
        if timed is not None:
            timed.active = False
    while eng.has_unfinished():
        eng.step()
    return out


class _Timed:
    """The kernels module, with each call timed (for `profile_decode`)."""

    def __init__(self, mod: Any) -> None:
        self.mod, self.seconds, self.calls, self.active = mod, {}, {}, False

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.mod, name)
        if name == "has_avx512_bf16":
            return fn

        def timed(*args: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args)
            if not self.active:
                return out
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            self.calls[name] = self.calls.get(name, 0) + 1
            return out

        return timed


def profile_decode(eng: LLMEngine, batch: int, steps: int, threads: int) -> dict[str, Any]:
    """Where a decode step's time goes: ms per step in each compiled kernel and in the rest
    (Python, torch ops, scheduler, sampler), with the linears' GFLOP/s and attention's GB/s."""
    from distserve.model import attention, kernels, layers

    mod = kernels.bf16_linear_kernels()
    if mod is None:
        return {}
    timed = _Timed(mod)
    model = eng.loaded.model
    packs = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    if model.lm_head_packed is not None:
        packs.append(model.lm_head_packed)
    saved = (attention.bf16_linear_kernels, attention.cpu_kernels, layers.bf16_linear_kernels)
    for p in packs:
        p._linear = timed.linear_bf16

    def get() -> Any:
        return timed

    attention.bf16_linear_kernels = attention.cpu_kernels = layers.bf16_linear_kernels = get
    # The fused decode layer is one C++ call per layer: run the per-kernel path instead so
    # each kernel is seen (its step is slower by the Python between the kernels).
    fused = [getattr(layer, "fused", None) for layer in model.layers]
    for layer in model.layers:
        layer.fused = None
    try:
        step = ours_decode(eng, batch, steps, [threads], timed)[threads]
    finally:
        for layer, f in zip(model.layers, fused, strict=True):
            layer.fused = f
        for p in packs:
            p._linear = mod.linear_bf16
        attention.bf16_linear_kernels, attention.cpu_kernels, layers.bf16_linear_kernels = saved
    cfg = eng.loaded.config
    n = timed.calls["linear_bf16"] / steps
    ms = {k: 1e3 * v / steps for k, v in timed.seconds.items()}
    lin_flops = 2 * batch * cfg.num_params  # the tied embedding is used once, as the LM head
    kv_bytes = batch * cfg.kv_bytes_per_token(2) * (CONTEXT + steps // 2)
    return {
        "batch": batch,
        "threads": threads,
        "step_ms": 1e3 * step,
        "kernel_ms": ms,
        "other_ms": 1e3 * step - sum(ms.values()),
        "linear_calls": n,
        "linear_gflop_s": lin_flops / (ms["linear_bf16"] / 1e3) / 1e9,
        "linear_weights_gb_s": 2 * cfg.num_params / (ms["linear_bf16"] / 1e3) / 1e9,
        "attention_gb_s": kv_bytes / (ms["paged_decode_attention"] / 1e3) / 1e9
        if ms.get("paged_decode_attention")
        else None,
    }


def serve_cold_start(timeout: float = 120.0) -> float:
    """Seconds from launching `distserve serve` (1P1D, Ray started by it) to the first
    completion it answers."""
    import shutil
    import signal
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = json.dumps({"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4}).encode()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [shutil.which("distserve") or "distserve", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"distserve serve exited with {proc.returncode}")
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                body,
                {"content-type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200 and json.load(r)["choices"]:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"no answer within {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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
        "--cold-start",
        action="store_true",
        help="also time `distserve serve` from launch to its first answer",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also break decode steps down by kernel (batch 1 and the largest batch)",
    )
    ap.add_argument(
        "--output", default="benchmarks/results/engine.json", help="where to write the JSON results"
    )
    args = ap.parse_args()
    lengths = [128, 512] if args.quick else [128, 512, 2048]
    batches = [1, 8] if args.quick else [1, 8, 32, 64]
    steps = 8 if args.quick else 24
    config = EngineConfig(
        cache=CacheConfig(kv_cache_gb=2.0),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=2048),
    )
    cold_start = serve_cold_start() if args.cold_start else None
    if cold_start is not None:
        print(f"serve cold start to first answer: {cold_start:.1f} s", flush=True)
    t0 = time.perf_counter()
    eng = LLMEngine(config)
    load_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    thread_counts = sorted({1, threads})
    limits = machine_limits(thread_counts)
    floors = model_floors(eng.loaded.config, limits)
    print(f"engine built in {load_s:.1f} s; limits: {json.dumps(limits)}", flush=True)
    ours: dict[str, Any] = {"prefill": {}, "prefill_1core": {}, "decode_step_s": {}}
    base: dict[str, Any] = {"prefill": {}, "decode": {}}
    hf = None if args.no_hf else hf_model(eng)
    for n in lengths:
        torch.set_num_threads(threads)
        ours["prefill"][n] = ours_prefill(eng, n, reps=2)
        if hf is not None:
            base["prefill"][n] = hf_prefill(hf, n, reps=2)
        if n == CONTEXT:
            torch.set_num_threads(1)
            ours["prefill_1core"][n] = ours_prefill(eng, n, reps=2)
            torch.set_num_threads(threads)
        print(f"prefill {n}: ours {ours['prefill'][n]:.0f} tok/s", flush=True)
    for b in batches:
        counts = thread_counts if b in (1, max(batches)) else [threads]
        ours["decode_step_s"][b] = ours_decode(eng, b, steps, counts)
        torch.set_num_threads(threads)
        if hf is not None:
            base["decode"][b] = hf_decode(hf, b, steps)
        print(f"decode batch {b}: ours {ours['decode_step_s'][b]} s/step", flush=True)
    big = max(batches)
    if args.profile:
        ours["profile"] = [
            profile_decode(eng, b, steps, t)
            for b, t in ((1, threads), (big, threads), (1, 1), (big, 1))
        ]
        for p in ours["profile"]:
            print(json.dumps(p), flush=True)
    step = ours["decode_step_s"]
    summary = {
        "decode_b1_step_ms": 1e3 * step[1][threads],
        f"decode_b{big}_tok_s": big / step[big][threads],
        "marginal_ms_per_seq_1core": 1e3 * (step[big][1] - step[1][1]) / (big - 1),
        "prefill_tok_s_per_core": ours["prefill_1core"].get(CONTEXT),
        "engine_load_s": load_s,
        "serve_cold_start_s": cold_start,
    }
    _print_table(ours, base, limits, floors, summary, threads)
    out = {
        "config": config.to_dict()
        | {"threads": threads, "context": CONTEXT, "decode_steps": steps},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "limits": limits,
        "floors": floors,
        "ours": ours,
        "hf": base,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _print_table(
    ours: dict[str, Any],
    base: dict[str, Any],
    limits: dict[str, dict[int, float]],
    floors: dict[str, float],
    summary: dict[str, Any],
    threads: int,
) -> None:
    def fmt(x: float | None, spec: str = ",.0f") -> str:
        return "-" if x is None else format(x, spec)

    print("\n| | ours | HF | limit |\n| --- | ---: | ---: | ---: |")
    for n, v in ours["prefill"].items():
        print(f"| prefill {n}-token prompt, tok/s ({threads} threads) | {fmt(v)} "
              f"| {fmt(base['prefill'].get(n))} | |")  # fmt: skip
    print(f"| prefill {CONTEXT}-token prompt, tok/s on 1 core | "
          f"{fmt(summary['prefill_tok_s_per_core'])} | | "
          f"{fmt(floors['prefill_tok_s_per_core'])} |")  # fmt: skip
    for b, per in ours["decode_step_s"].items():
        t = per[threads]
        hf = base["decode"].get(b)
        limit = f"{floors['decode_b1_step_ms']:.1f} ms" if b == 1 else ""
        print(f"| decode batch {b}, tok/s (ms/step) | {b / t:,.0f} ({1e3 * t:.1f}) "
              f"| {fmt(hf)} ({fmt(hf and 1e3 * b / hf, '.1f')}) | {limit} |")  # fmt: skip
    print(f"| one more sequence in a decode batch, ms on 1 core | "
          f"{summary['marginal_ms_per_seq_1core']:.2f} | | "
          f"{floors['marginal_ms_per_seq_1core']:.2f} |")  # fmt: skip
    bw, peak = limits["read_gb_s"], limits["bf16_gflop_s"]
    print(f"| memory read bandwidth, GB/s (1 / 2 threads) | | | "
          f"{' / '.join(f'{bw[t]:.1f}' for t in sorted(bw))} |")  # fmt: skip
    print(f"| bf16 matmul peak through torch, GFLOP/s (1 / 2 threads) | | | "
          f"{' / '.join(f'{peak[t]:.0f}' for t in sorted(peak))} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
