"""Which grammar library constrains sampling (design note 27): llguidance, xgrammar and
outlines-core on SmolLM2-135M's vocabulary (49,152 tokens, our own BPE's byte strings),
one CPU thread each.

    python benchmarks/grammar_libraries.py [--repeats 5]
        [--output benchmarks/results/grammar_libraries.json]

For each library and each grammar (JSON mode: any object; a JSON schema with nested
properties): the time to build its view of the vocabulary, to compile the grammar, and per
token of a fixed valid document (SmolLM2's own tokens of it) the time to compute the
allowed-token bitmask and to advance the state with the token. Per-token numbers are the
median over tokens of each token's fastest of `--repeats` passes (a noisy shared machine
slows some passes, never speeds one up). Libraries that are not installed are skipped
(`pip install --no-deps llguidance xgrammar apache-tvm-ffi outlines-core`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from distserve.model.metadata import load_tokenizer
from distserve.model.registry import resolve
from distserve.model.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["mathematician", "writer", "analyst"],
    "address": {"city": "London", "zip": "W1 4AB"},
}
GRAMMARS = {"json_object": {"type": "object"}, "json_schema": SCHEMA}

Matcher = tuple[Callable[[], Any], Callable[[int], Any]]
"""(compute the next mask, consume a token)"""


def llguidance_lib(tok: Tokenizer) -> tuple[Callable[[dict[str, Any]], Matcher], float]:
    import llguidance as llg
    import numpy as np

    t0 = time.perf_counter()
    tokens, special = tok.token_bytes()

    class Vocab:
        eos_token_id, bos_token_id = tok.eos_token_id, tok.bos_token_id
        special_token_ids = special

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, s: bytes) -> list[int]:
            return tok.encode(s.decode("utf-8", "replace"), add_special_tokens=False)

    lt = llg.LLTokenizer(llg.TokenizerWrapper(Vocab()))
    setup = time.perf_counter() - t0

    def compile_(schema: dict[str, Any]) -> Matcher:
        m = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        mask = np.zeros((lt.vocab_size + 31) // 32, dtype=np.int32)
        # the lambda holds `mask` itself: the library writes through its address
        return (lambda: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)), m.consume_token

    return compile_, setup


def xgrammar_lib(tok: Tokenizer) -> tuple[Callable[[dict[str, Any]], Matcher], float]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    tokens, _ = tok.token_bytes()
    info = xgr.TokenizerInfo(
        tokens, xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[tok.eos_token_id]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t0

    def compile_(schema: dict[str, Any]) -> Matcher:
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(tokens))
        return (lambda: m.fill_next_token_bitmask(mask)), m.accept_token

    return compile_, setup


def outlines_lib(tok: Tokenizer) -> tuple[Callable[[dict[str, Any]], Matcher], float]:
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    tokens, special = tok.token_bytes()
    by_bytes: dict[bytes, list[int]] = {}
    skip = set(special)
    for i, b in enumerate(tokens):
        if i not in skip and b:
            by_bytes.setdefault(b, []).append(i)
    vocab = Vocabulary(tok.eos_token_id, by_bytes)
    setup = time.perf_counter() - t0

    def compile_(schema: dict[str, Any]) -> Matcher:
        # compact separators, as the other two are asked for
        regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")
        guide = Guide(Index(regex, vocab))
        mask = np.zeros((len(tokens) + 31) // 32, dtype=np.int32)
        return (lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4)), (
            lambda t: guide.advance(t, return_tokens=False)
        )

    return compile_, setup


LIBS = {"llguidance": llguidance_lib, "xgrammar": xgrammar_lib, "outlines-core": outlines_lib}


def bench(name: str, tok: Tokenizer, repeats: int) -> dict[str, Any]:  # one library, every grammar
    try:
        compile_, setup = LIBS[name](tok)
    except ImportError as e:
        return {"skipped": f"not installed: {e}"}
    out: dict[str, Any] = {"vocabulary_setup_s": round(setup, 4)}
    ids = tok.encode(json.dumps(DOC), add_special_tokens=False)
    for gname, schema in GRAMMARS.items():
        t0 = time.perf_counter()
        compute, consume = compile_(schema)
        compile_s = time.perf_counter() - t0
        mask_us = [float("inf")] * (len(ids) + 1)
        step_us = [float("inf")] * len(ids)
        for r in range(repeats):
            if r:
                compute, consume = compile_(schema)
            for k, t in enumerate([*ids, None]):
                a = time.perf_counter()
                compute()
                b = time.perf_counter()
                mask_us[k] = min(mask_us[k], (b - a) * 1e6)
                if t is None:
                    break
                ok = consume(t)
                step_us[k] = min(step_us[k], (time.perf_counter() - a) * 1e6)
                if ok is False:
                    raise RuntimeError(f"{name} rejected token {k} ({t}) of the document")
        out[gname] = {
            "compile_s": round(compile_s, 4),
            "tokens": len(ids),
            "mask_us_median": round(statistics.median(mask_us), 1),
            "mask_us_max": round(max(mask_us), 1),
            "mask_and_advance_us_median": round(statistics.median(step_us), 1),
            "mask_and_advance_us_total": round(sum(step_us), 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="passes over the document")
    ap.add_argument(
        "--output", default="benchmarks/results/grammar_libraries.json", help="JSON results file"
    )
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _, tok = load_tokenizer(resolve("smollm2-135m"))
    results: dict[str, Any] = {"vocab_size": tok.vocab_size, "document": DOC}
    for name in LIBS:
        results[name] = r = bench(name, tok, args.repeats)
        print(name, json.dumps(r, indent=1))
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print("wrote", args.output)


if __name__ == "__main__":
    main()
