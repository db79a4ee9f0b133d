"""`distserve generate`: offline generation on this machine."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from distserve.cli.common import add_engine_flags, add_prefix_caching_flag
from distserve.cli.values import flag_message, positive_int

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A --stop value with the escapes a shell user types read as the characters they name
    (a shell passes '\\n' as a backslash and an n); any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def add_parser(verbs: Any) -> argparse.ArgumentParser:
    gen = verbs.add_parser(
        "generate",
        help="generate text for prompts offline",
        description="Generate text for one or more prompts on this machine (batched together).",
    )
    gen.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help="prompt text; several are batched together"
    )
    gen.add_argument(
        "--max-tokens",
        type=positive_int,
        default=64,
        help="most tokens to generate per prompt (default: 64)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy (default: 0)",
    )
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)"
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k most likely tokens; 0: all (default: 0)",
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="sampling seed, for reproducible non-greedy output"
    )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        type=unescape,
        help="stop when this text appears (repeatable); \\n, \\t, \\r and \\\\ are read as "
        "escapes, so --stop '\\n' stops at the end of a line",
    )
    gen.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat template",
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help='print {"outputs": [{"prompt", "text", "token_ids"}]} instead of text',
    )
    add_engine_flags(gen)
    add_prefix_caching_flag(gen)

    return gen  # type: ignore[no-any-return]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from distserve.core import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        parser.error(flag_message(e, parser))
    from distserve.llm import LLM

    try:
        llm = LLM(
            args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            kv_cache_gb=args.kv_cache_gb,
            max_model_len=args.max_model_len,
            prefix_caching=args.prefix_caching,
        )
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--model {args.model}: {e}")
    prompts = args.prompts
    if args.chat:
        prompts = [
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts
        ]
    try:
        outputs = llm.generate(prompts, params)
    except ValueError as e:
        print(f"distserve generate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        rows: list[dict[str, Any]] = [
            {"prompt": p, "text": o.text, "token_ids": o.token_ids}
            for p, o in zip(args.prompts, outputs, strict=True)
        ]
        print(json.dumps({"outputs": rows}, ensure_ascii=False))
    else:
        for i, o in enumerate(outputs):
            if len(outputs) > 1:
                print(f"--- [{i}] {args.prompts[i]}")
            print(o.text)
    return 0
