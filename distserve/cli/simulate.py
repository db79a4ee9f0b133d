"""`distserve simulate`: run a placement on a workload in the simulator."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from distserve.cli.bench import DATASETS, _clean, _range
from distserve.cli.common import (
    add_serving_path_scale_flags,
    flag_message,
    positive_float,
    positive_int,
)


def add_parser(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        "simulate",
        help="simulate a placement on a workload with a latency profile",
        description="Drive the engine's schedulers with a latency model on a virtual clock; "
        "write the same results JSON as `distserve bench`.",
    )
    p.add_argument(
        "--profile", required=True, help="profile JSON (ours, or the paper's A100 coefficient file)"
    )
    p.add_argument(
        "--profile-decode", default=None, help="a different profile for decode instances"
    )
    p.add_argument(
        "--profile-model",
        default=None,
        help="model to pick when a profile file holds several (e.g. opt-13b)",
    )
    p.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        help="tensor parallel degree to pick from the profile (default: 1)",
    )
    p.add_argument(
        "--mode",
        default="disagg",
        choices=["disagg", "colocated"],
        help="placement mode (default: disagg)",
    )
    p.add_argument(
        "--prefill-instances", type=positive_int, default=1, help="disagg: prefill instances"
    )
    p.add_argument(
        "--decode-instances", type=positive_int, default=1, help="disagg: decode instances"
    )
    p.add_argument("--instances", type=positive_int, default=2, help="colocated: instances")
    p.add_argument("--chunked-prefill", action="store_true", help="colocated: chunked prefill")
    p.add_argument(
        "--max-num-seqs", type=positive_int, default=64, help="most requests per step (default: 64)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=2048,
        help="token budget per step (default: 2048)",
    )
    p.add_argument(
        "--step-overhead",
        type=float,
        default=0.0,
        help="seconds per step outside the model (default: 0)",
    )
    add_serving_path_scale_flags(p)
    p.add_argument(
        "--step-noise",
        type=positive_float,
        default=None,
        metavar="SIGMA",
        help="draw each step's time around the model (lognormal, mean 1, this sigma; seeded "
        "by --seed), as served steps vary; `trace_fit` reads it from a step trace "
        "(default: none)",
    )
    p.add_argument(
        "--transfer-bandwidth",
        type=positive_float,
        default=None,
        help="KV migration bytes/s (default: the profile's, else 1e10)",
    )
    p.add_argument(
        "--num-blocks",
        type=positive_int,
        default=None,
        help="KV blocks per instance (default: the profile's capacity)",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="tokenizer that measures dataset prompts (default: smollm2-135m)",
    )
    p.add_argument(
        "--dataset", default="chatbot", choices=DATASETS, help="workload (default: chatbot)"
    )
    p.add_argument("--trace", default=None, help="trace file for --dataset trace")
    p.add_argument(
        "--num-requests", type=positive_int, default=1000, help="requests (default: 1000)"
    )
    p.add_argument(
        "--rate", type=positive_float, default=1.0, help="mean requests per second (default: 1)"
    )
    p.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="coefficient of variation of arrival gaps (default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument(
        "--max-prompt-len", type=positive_int, default=None, help="cut prompts to this many tokens"
    )
    p.add_argument("--max-output-len", type=positive_int, default=None, help="cap output lengths")
    p.add_argument(
        "--prompt-len", type=_range, default=(128, 512), help="random/fixed: prompt length LO,HI"
    )
    p.add_argument(
        "--output-len", type=_range, default=(32, 128), help="random/fixed: output length LO,HI"
    )
    p.add_argument("--ttft-slo", type=positive_float, required=True, help="TTFT target (s)")
    p.add_argument("--tpot-slo", type=positive_float, required=True, help="TPOT target (s)")
    p.add_argument("--output", default=None, help="write {config, summary, requests} JSON here")
    return p  # type: ignore[no-any-return]


def pick_profile(path: str, model: str | None, tp: int) -> Any:
    from distserve.sim.profile import find, load_profiles

    profiles = load_profiles(path)
    names = sorted({p.model for p in profiles})
    if model is None:
        if len(names) > 1:
            raise ValueError(f"profile_model is needed: {path} holds {', '.join(names)}")
        model = names[0]
    return find(profiles, model, tp)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from distserve.bench.run import tokenizer_for
    from distserve.config import PlacementConfig
    from distserve.core import SchedulerConfig
    from distserve.sim.run import SimOptions, sim_config, simulate
    from distserve.workload.build import WorkloadSpec, build_workload

    try:
        prefill = pick_profile(args.profile, args.profile_model, args.tp)
        decode = (
            pick_profile(args.profile_decode, args.profile_model, args.tp)
            if args.profile_decode
            else None
        )
        placement = PlacementConfig(
            mode=args.mode,
            num_prefill=args.prefill_instances,
            num_decode=args.decode_instances,
            num_instances=args.instances,
            chunked_prefill=args.chunked_prefill,
        )
        sched = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=2048,
            chunked_prefill=args.chunked_prefill,
        )
        opts = SimOptions(
            step_overhead=args.step_overhead,
            compute_scale=args.compute_scale,
            decode_scale=args.decode_scale,
            contended_scale=args.contended_scale,
            contended_decode_scale=args.contended_decode_scale,
            decode_seq_time=args.decode_seq_time,
            transfer_bandwidth=args.transfer_bandwidth,
            num_blocks=args.num_blocks,
            scheduler=sched,
        )
        config = sim_config(placement, prefill, decode, opts)
        if args.step_noise:
            config = dataclasses.replace(config, step_noise=args.step_noise, seed=args.seed)
        spec = WorkloadSpec(
            dataset=args.dataset,
            num_requests=args.num_requests,
            rate=args.rate,
            burstiness=args.burstiness,
            seed=args.seed,
            max_prompt_len=args.max_prompt_len,
            max_output_len=args.max_output_len,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            trace_path=args.trace,
        )
        workload = build_workload(spec, tokenizer_for(args.model))
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(flag_message(ValueError(str(e).strip("'\"")), parser))
    summary, _ = simulate(config, workload, args.ttft_slo, args.tpot_slo, args.output)
    print(json.dumps(_clean(summary), indent=1))
    return 0
