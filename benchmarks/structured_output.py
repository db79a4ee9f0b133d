"""What structured output costs per token (design note 27): decode tokens/s of SmolLM2 on
one core with and without a grammar, through the offline engine (the same step loop
pieces as a served instance: `Constraints.apply` on the plan, the worker's sampler).

    python benchmarks/structured_output.py [--core 1] [--batch 1 8] [--tokens 96]
        [--repeats 3] [--output benchmarks/results/structured_output.json]

Modes: `none` (no response_format; ignore_eos, so every request runs `--tokens`),
`json_object` (JSON mode) and `json_schema` (an array of records). Greedy, a batch of
identical prompts admitted together, so each batch's steps carry the same rows. Per mode
and batch: decode tokens/s (batch / the median decode step), the controller side's mask
time per token (`Constraints.apply`, timed), the sampler's masking time per row
(`apply_allowed` on [batch, 49152] logits), and what the two add to an unconstrained step
(`mask_share_of_step_pct`). Step and mask times are medians over a run's decode steps
with every request still running; the best of `--repeats` runs is kept (a shared machine
only slows runs down). Step times of one mode spread more across runs here than the
modes differ: the masks' own times are the measure of their cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from distserve.core import SamplingParams
from distserve.llm import LLM
from distserve.runtime.structured import JSON_OBJECT, check_schema
from distserve.runtime.worker.sampler import apply_allowed

PROMPT = [{"role": "user", "content": "List ten European countries with their capitals."}]
SCHEMA = check_schema(
    {
        "type": "object",
        "properties": {
            "countries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                    "required": ["country", "capital"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["countries"],
        "additionalProperties": False,
    }
)
MODES = {"none": None, "json_object": JSON_OBJECT, "json_schema": SCHEMA}


def run_once(llm: LLM, schema: str | None, batch: int, tokens: int) -> dict[str, float]:
    """One batch to its end; medians over its decode steps (a preempted step is an
    outlier there, not a shift)."""
    eng = llm.engine
    params = SamplingParams(
        temperature=0, max_tokens=tokens, json_schema=schema, ignore_eos=schema is None
    )
    prompt = eng.tokenizer.apply_chat_template(PROMPT)
    for _ in range(batch):
        eng.add_request(prompt, params)
    apply, mask_seconds = eng.constraints.apply, [0.0]

    def timed(plan: Any, requests: Any) -> Any:
        t0 = time.perf_counter()
        out = apply(plan, requests)
        mask_seconds[0] += time.perf_counter() - t0
        return out

    eng.constraints.apply = timed  # type: ignore[method-assign]
    steps: list[tuple[float, float, int]] = []  # (step s, mask s, rows) of decode steps
    first, decode_tokens = True, 0
    try:
        while eng.has_unfinished():
            mask_seconds[0] = 0.0
            t0 = time.perf_counter()
            outs = eng.step()
            elapsed = time.perf_counter() - t0
            if first:  # the prefill step (every prompt, its first token)
                first = False
                continue
            rows = sum(len(o.new_token_ids) for o in outs)
            decode_tokens += rows
            steps.append((elapsed, mask_seconds[0], rows))
    finally:
        eng.constraints.apply = apply  # type: ignore[method-assign]
    full = [s for s in steps if s[2] == batch] or steps
    step_s = statistics.median(s[0] for s in full)
    return {
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": batch / step_s,
        "ms_per_step": 1e3 * step_s,
        "mask_us_per_token": 1e6 * statistics.median(s[1] for s in full) / batch,
    }


def sampler_mask_us(batch: int, vocab: int = 49152, repeats: int = 200) -> float:
    """Microseconds per row to apply a bitmask to [batch, vocab] logits in the sampler."""
    logits = torch.randn(batch, vocab)
    masks: list[bytes | None] = [bytes(range(256)) * (vocab // 8 // 256)] * batch
    apply_allowed(logits, masks)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_allowed(logits, masks)
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--core", type=int, default=1, help="the one CPU core the engine runs on")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="requests per batch")
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens of each request")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode and batch (best kept)")
    ap.add_argument(
        "--output", default="benchmarks/results/structured_output.json", help="JSON results file"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(cores=(args.core,), kv_cache_gb=0.2)
    results: dict[str, Any] = {"core": args.core, "max_tokens": args.tokens, "runs": []}
    for batch in args.batch:
        for _ in range(args.repeats):  # modes interleaved: drift hits each alike
            for mode, schema in MODES.items():
                r = run_once(llm, schema, batch, args.tokens)
                results["runs"].append({"mode": mode, "batch": batch, **r})
    best: dict[str, Any] = {}
    for batch in args.batch:
        for mode in MODES:
            runs = [r for r in results["runs"] if r["mode"] == mode and r["batch"] == batch]
            top = max(runs, key=lambda r: r["decode_tokens_per_s"])
            best[f"{mode}/batch{batch}"] = {k: round(v, 2) for k, v in top.items() if k != "mode"}
        sampler_us = sampler_mask_us(batch)
        best[f"sampler_mask_us_per_row/batch{batch}"] = round(sampler_us, 1)
        # what the masks themselves add, against the unconstrained step (step times of one
        # mode spread wider than this across runs on a shared machine)
        base_us = 1e3 * best[f"none/batch{batch}"]["ms_per_step"]
        for mode in ("json_object", "json_schema"):
            mask_us = best[f"{mode}/batch{batch}"]["mask_us_per_token"]
            best[f"{mode}/batch{batch}"]["mask_share_of_step_pct"] = round(
                100 * (mask_us + sampler_us) * batch / base_us, 2
            )
    results["best"] = best
    for key, value in best.items():
        print(f"{key:32s} {value}")
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print("wrote", args.output)


if __name__ == "__main__":
    main()
