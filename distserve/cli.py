"""`distserve <verb>`: parses flags into configs and calls one function per verb.
Heavy modules load inside the verbs, so `distserve --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from distserve.config import TRANSPORTS
from distserve.model.registry import DEFAULT_MODEL

# SamplingParams field -> the flag that sets it, so errors name the flag.
_FLAG_OF = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
}


def _flag_message(error: ValueError, parser: argparse.ArgumentParser) -> str:
    """A config error ('kv_cache_gb must be > 0, ...') with its field named as the flag
    that sets it, when there is one."""
    text = str(error)
    field = text.split(" ", 1)[0]
    flag = "--" + field.replace("_", "-")
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    return f"{flag}: {text}" if flag in known else text


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered model name, HF directory or .gguf file (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "random"],
        help="auto: the model's own weights; random: random weights of its shape",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="compute and KV-cache dtype (default: bfloat16)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:n] (default: cpu)")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=1.0,
        help="memory for the KV cache in GiB (default: 1.0)",
    )
    p.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=2048,
        help="longest prompt + output in tokens (default: 2048)",
    )


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="distserve",
        description="Goodput-optimized LLM serving with disaggregated prefill and decoding.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
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
        type=_positive_int,
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
        help="stop when this text appears (repeatable)",
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
    _add_engine_flags(gen)

    srv = verbs.add_parser(
        "serve",
        help="serve the OpenAI API with disaggregated or colocated instances",
        description="Start instances (Ray actors) and an OpenAI-compatible HTTP server; "
        "prints the URL when ready.",
    )
    srv.add_argument(
        "--mode",
        default="disagg",
        choices=["disagg", "colocated"],
        help="disagg: prefill + decode instances; colocated: instances doing both "
        "(default: disagg)",
    )
    srv.add_argument(
        "--prefill-instances",
        type=_positive_int,
        default=1,
        help="disagg: number of prefill instances (default: 1)",
    )
    srv.add_argument(
        "--decode-instances",
        type=_positive_int,
        default=1,
        help="disagg: number of decode instances (default: 1)",
    )
    srv.add_argument(
        "--instances",
        type=_positive_int,
        default=2,
        help="colocated: number of instances (default: 2)",
    )
    srv.add_argument(
        "--chunked-prefill",
        action="store_true",
        help="colocated: Sarathi-style chunked prefill (decodes and prompt chunks share "
        "one token budget)",
    )
    srv.add_argument(
        "--cores-per-instance",
        type=_positive_int,
        default=None,
        help="CPU cores each instance owns (default: the machine's cores shared evenly)",
    )
    srv.add_argument(
        "--prefill-kv-cache-gb",
        type=float,
        default=None,
        help="disagg: KV cache GiB of each prefill instance (default: --kv-cache-gb)",
    )
    srv.add_argument(
        "--decode-kv-cache-gb",
        type=float,
        default=None,
        help="disagg: KV cache GiB of each decode instance (default: --kv-cache-gb)",
    )
    srv.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=64,
        help="most requests in one step (default: 64)",
    )
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default: 127.0.0.1, this machine only)",
    )
    srv.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)"
    )
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(or set DISTSERVE_API_KEY)",
    )
    srv.add_argument(
        "--ray-address",
        default=None,
        help="address of an existing Ray cluster (default: start a local one)",
    )
    srv.add_argument(
        "--transport",
        default="auto",
        choices=TRANSPORTS,
        help="how KV migrates from prefill to decode workers: auto (shared memory on one "
        "node, else the Ray object store), shm, object-store, gloo (torch.distributed, CPU) "
        "or nccl (GPU) (default: auto)",
    )
    srv.add_argument(
        "--no-ray",
        action="store_true",
        help="run every worker inside the server process (no Ray; for debugging)",
    )
    _add_engine_flags(srv)
    return parser, {"generate": gen, "serve": srv}


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio
    import os

    from distserve.config import EngineConfig, PlacementConfig
    from distserve.core import CacheConfig, SchedulerConfig
    from distserve.model.registry import resolve
    from distserve.server.launch import ServerConfig, serve

    try:
        resolve(args.model, args.load_format)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--model {args.model}: {e}")
    if args.chunked_prefill and args.mode != "colocated":
        parser.error("--chunked-prefill applies to --mode colocated only")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        engine = EngineConfig(
            model=args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            cache=CacheConfig(kv_cache_gb=args.kv_cache_gb),
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=max(2048, args.max_model_len),
                max_model_len=args.max_model_len,
            ),
        )
        placement = PlacementConfig(
            mode=args.mode,
            num_prefill=args.prefill_instances,
            num_decode=args.decode_instances,
            num_instances=args.instances,
            chunked_prefill=args.chunked_prefill,
            cores_per_instance=args.cores_per_instance,
            prefill_kv_cache_gb=args.prefill_kv_cache_gb,
            decode_kv_cache_gb=args.decode_kv_cache_gb,
        )
        server = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("DISTSERVE_API_KEY"),
            ray_address=args.ray_address,
            use_ray=not args.no_ray,
            transport=args.transport,
        )
    except ValueError as e:
        parser.error(_flag_message(e, parser))
    asyncio.run(serve(engine, placement, server))
    return 0


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
        field = str(e).split(" ", 1)[0]
        parser.error(f"{_FLAG_OF.get(field, field)}: {e}")
    from distserve.llm import LLM

    try:
        llm = LLM(
            args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            kv_cache_gb=args.kv_cache_gb,
            max_model_len=args.max_model_len,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser, verbs = _build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    run = {"generate": _generate, "serve": _serve}[args.verb]
    return run(args, verbs[args.verb])


if __name__ == "__main__":
    sys.exit(main())
