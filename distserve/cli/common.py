"""Flag helpers shared by the verbs, and the flag groups that several verbs take: each
group is declared here once, so a flag means the same and is checked the same wherever
it appears."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from distserve.cli.values import (
    flag_message,
    length_range,
    nonnegative_float,
    positive_float,
    positive_int,
    share,
)
from distserve.config import DTYPE_CHOICES
from distserve.model.registry import DEFAULT_MODEL
from distserve.sim.serving_path import ServingPath
from distserve.workload.spec import DATASETS, SESSION_DATASETS

if TYPE_CHECKING:
    from distserve.workload.build import WorkloadSpec


def add_workload_flags(
    p: argparse.ArgumentParser, num_requests: int, sessions: bool = False
) -> None:
    """Which requests a verb sends or simulates (bench, goodput, simulate, plan): the
    `WorkloadSpec` fields that pick and cut them. `workload_spec` reads them back.
    sessions=True (a client or the simulator): the flags of the multi-turn datasets too."""
    p.add_argument(
        "--dataset",
        default="chatbot",
        choices=DATASETS,
        help="workload to draw requests from (default: chatbot = ShareGPT; conversations = "
        "ShareGPT replayed as multi-turn sessions: bench, goodput and simulate)",
    )
    if sessions:
        p.add_argument(
            "--max-turns",
            type=positive_int,
            default=8,
            help="conversations: most turns of one session; a session also ends before a "
            "turn that would not fit --max-prompt-len or the 2048-token context (default: 8)",
        )
        p.add_argument(
            "--think-time",
            type=nonnegative_float,
            default=1.0,
            help="conversations: mean seconds (exponential, seeded) from a turn's answer to "
            "the session's next turn (default: 1)",
        )
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="trace file (timestamp, prompt_len, output_len) for --dataset trace",
    )
    p.add_argument(
        "--num-requests",
        type=positive_int,
        default=num_requests,
        help=f"requests per run{'; conversations: sessions' if sessions else ''} "
        f"(default: {num_requests})",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of request sampling and arrivals (default: 0)"
    )
    p.add_argument(
        "--max-prompt-len",
        type=positive_int,
        default=None,
        help="cut prompts to this many tokens (for small hardware)",
    )
    p.add_argument(
        "--max-output-len",
        type=positive_int,
        default=None,
        help="cap output lengths (for small hardware)",
    )


def add_arrival_flags(
    p: argparse.ArgumentParser, rate: bool = True, sessions: bool = False
) -> None:
    """How the requests of one replayed workload arrive, and the lengths of random/fixed
    ones (bench, goodput, simulate; the planner chooses its own rates). rate=False: the
    verb takes its rates another way (goodput's --rates)."""
    if rate:
        p.add_argument(
            "--rate",
            type=positive_float,
            default=1.0,
            help="mean requests per second"
            + ("; conversations: sessions per second" if sessions else "")
            + "; inf sends all at once (default: 1)",
        )
    p.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="coefficient of variation of arrival gaps; 1 is Poisson (default: 1)",
    )
    p.add_argument(
        "--prompt-len",
        type=length_range,
        default=(128, 512),
        help="random/fixed: prompt length LO,HI (default: 128,512)",
    )
    p.add_argument(
        "--output-len",
        type=length_range,
        default=(32, 128),
        help="random/fixed: output length LO,HI (default: 32,128)",
    )


def add_tokenizer_flag(p: argparse.ArgumentParser, default: str | None) -> None:
    """--model: whose tokenizer turns dataset text into prompt tokens. None: the served
    model's (asked of the server)."""
    p.add_argument(
        "--model",
        default=default,
        help=f"model whose tokenizer measures prompts (default: {default or 'the served model'})",
    )


def add_slo_flags(p: argparse.ArgumentParser, attainment: str | None = None) -> None:
    """The latency targets a request must meet, and, under the verb's own flag name
    (goodput's --target, plan's --attainment), the share of requests that must meet them."""
    p.add_argument(
        "--ttft-slo",
        type=positive_float,
        required=True,
        help="time-to-first-token target in seconds",
    )
    p.add_argument(
        "--tpot-slo",
        type=positive_float,
        required=True,
        help="time-per-output-token target in seconds",
    )
    if attainment is not None:
        p.add_argument(
            attainment,
            type=share,
            default=0.9,
            help="share of requests that must meet both targets, in (0, 1] (default: 0.9)",
        )


def workload_spec(args: argparse.Namespace, rate: float) -> WorkloadSpec:
    """The `WorkloadSpec` the workload flags describe; a verb without the arrival flags
    gets the spec's defaults for those. Raises ValueError as the spec does."""
    from distserve.workload.build import WorkloadSpec

    if args.dataset in SESSION_DATASETS and "think_time" not in args:
        raise ValueError(
            f"dataset {args.dataset!r} is replayed as sessions by bench, goodput and simulate "
            "only: the planner's search does not model sessions yet"
        )
    arrivals = {
        k: getattr(args, k)
        for k in ("burstiness", "prompt_len", "output_len", "max_turns", "think_time")
        if k in args
    }
    return WorkloadSpec(
        dataset=args.dataset,
        num_requests=args.num_requests,
        rate=rate,
        seed=args.seed,
        max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len,
        trace_path=args.trace,
        **arrivals,
    )


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    """How many instances of each role run (serve, simulate): `PlacementConfig`'s counts."""
    p.add_argument(
        "--mode",
        default="disagg",
        choices=["disagg", "colocated"],
        help="disagg: prefill + decode instances; colocated: instances doing both "
        "(default: disagg)",
    )
    p.add_argument(
        "--prefill-instances",
        type=positive_int,
        default=1,
        help="disagg: number of prefill instances (default: 1)",
    )
    p.add_argument(
        "--decode-instances",
        type=positive_int,
        default=1,
        help="disagg: number of decode instances (default: 1)",
    )
    p.add_argument(
        "--instances",
        type=positive_int,
        default=2,
        help="colocated: number of instances (default: 2)",
    )
    p.add_argument(
        "--chunked-prefill",
        action="store_true",
        help="colocated: Sarathi-style chunked prefill (decodes and prompt chunks share "
        "one token budget)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
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
        default="auto",
        choices=list(DTYPE_CHOICES),
        help="compute and KV-cache dtype (default: auto: bfloat16 on CUDA and on CPUs with "
        "AVX512-BF16 or AMX, float32 on other CPUs, where bf16 matmuls are emulated)",
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
        type=positive_int,
        default=2048,
        help="longest prompt + output in tokens (default: 2048)",
    )


def add_prefix_caching_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt whole: no reuse of the KV of prefixes computed before "
        "(default: full blocks are cached by prefix and reused)",
    )


def add_serving_path_flags(
    p: argparse.ArgumentParser, defaults: Mapping[str, float | None] | None = None
) -> None:
    """One flag per serving-path knob (--step-overhead, --compute-scale, ...): its help,
    bound and default from `ServingPath`'s field; `defaults` sets a verb's own."""
    for f in dataclasses.fields(ServingPath):
        default = (defaults or {}).get(f.name, f.default)
        shown = f.metadata["unset"] if default is None else f"{default:g}".replace("e+", "e")
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=nonnegative_float if f.metadata["bound"] == ">= 0" else positive_float,
            default=default,
            help=f"{f.metadata['help']} (default: {shown})",
        )


def serving_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServingPath:
    """The serving path the flags of `add_serving_path_flags` give; a value out of its
    bounds is an error that names its flag."""
    try:
        return ServingPath(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServingPath)}
        )
    except ValueError as e:
        parser.error(flag_message(e, parser))


def serving_path_json(
    flag: str, text: str, base: ServingPath, parser: argparse.ArgumentParser
) -> ServingPath:
    """The serving path a flag's JSON object gives (inline or in a file holding one): its
    keys over `base`'s knobs; an error names the flag."""
    try:
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON object or a file holding one ({e})") from None
        if not isinstance(d, dict):
            raise ValueError("must be a JSON object")
        return ServingPath.from_dict(d, base)
    except ValueError as e:
        parser.error(f"{flag}: {e}")
