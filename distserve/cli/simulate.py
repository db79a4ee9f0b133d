"""`distserve simulate`: run a placement on a workload in the simulator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from distserve.cli.common import (
    add_arrival_flags,
    add_placement_flags,
    add_prefix_caching_flag,
    add_serving_path_flags,
    add_slo_flags,
    add_tokenizer_flag,
    add_workload_flags,
    serving_path,
    workload_spec,
)
from distserve.cli.live_flags import add_replan_flags
from distserve.cli.values import (
    flag_message,
    json_safe,
    nonnegative_float,
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
    add_placement_flags(p)
    p.add_argument(
        "--max-num-seqs", type=positive_int, default=64, help="most requests per step (default: 64)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=2048,
        help="token budget per step (default: 2048)",
    )
    add_serving_path_flags(p)
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
        "--num-blocks",
        type=positive_int,
        default=None,
        help="KV blocks per instance (default: the profile's capacity)",
    )
    add_prefix_caching_flag(p)
    p.add_argument(
        "--kv-store-gb",
        type=nonnegative_float,
        default=0.0,
        metavar="GIB",
        help="a KV store of this size, as serve's: prompts load the prefix blocks another "
        "instance computed from it (default: 0, none)",
    )
    p.add_argument(
        "--kv-store-disk-gb",
        type=positive_float,
        default=0.0,
        metavar="GIB",
        help="the store's disk tier, as serve's: blocks evicted from the store's memory go "
        "there and prompts load them back (the read is not timed; default: 0, none)",
    )
    p.add_argument(
        "--prefill-on-decode",
        action="store_true",
        help="disagg: a decode instance prefills a new prompt itself (no KV migration) when "
        "the latency model says it would be decoding sooner than behind the prefill queue "
        "plus the migration, and the step stays within --tpot-slo (so long prompts always "
        "go to prefill), as serve --prefill-on-decode does (default: off)",
    )
    g = p.add_argument_group("adaptive layout (as serve --adaptive)")
    g.add_argument(
        "--adaptive",
        default=None,
        metavar="PROFILE",
        help="follow the traffic as serve --adaptive does: every --replan-interval s replay "
        "the requests of the last --live-window s (finished or not) on every layout of the "
        "instances with this latency profile JSON (or a bundled name; usually --profile's) "
        "and flip roles (drain, then a new scheduler) to the best one; the summary lists the "
        "flips and re-plans (default: off)",
    )
    g.add_argument(
        "--live-window",
        type=positive_float,
        default=120.0,
        help="--adaptive: seconds of finished traffic a re-plan looks at (default: 120)",
    )
    add_replan_flags(g)
    add_tokenizer_flag(p, "smollm2-135m")
    add_workload_flags(p, num_requests=1000, sessions=True)
    add_arrival_flags(p, sessions=True)
    add_slo_flags(p)
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
    from distserve.config import PlacementConfig
    from distserve.core import SchedulerConfig
    from distserve.model.metadata import tokenizer_for
    from distserve.sim.run import SimOptions, sim_config, simulate
    from distserve.workload.build import build_workload

    path = serving_path(args, parser)
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
            path, num_blocks=args.num_blocks, scheduler=sched, prefix_caching=args.prefix_caching,
            kv_store_gb=args.kv_store_gb, kv_store_disk_gb=args.kv_store_disk_gb,
        )  # fmt: skip
        config = sim_config(placement, prefill, decode, opts)
        if args.step_noise:
            config = dataclasses.replace(config, step_noise=args.step_noise, seed=args.seed)
        if args.prefill_on_decode:
            if args.mode != "disagg":
                raise ValueError("prefill_on_decode applies to --mode disagg only")
            config = dataclasses.replace(config, prefill_on_decode=args.tpot_slo)
        if args.adaptive is not None:
            from distserve.sim.profile import BUNDLED
            from distserve.sim.replan import AdaptiveConfig

            if args.mode == "colocated" and args.chunked_prefill:
                raise ValueError("adaptive starts unchunked: it turns chunked prefill on "
                                 "itself (replan_chunk)")  # fmt: skip
            if args.adaptive not in BUNDLED and not os.path.isfile(args.adaptive):
                raise ValueError(f"adaptive {args.adaptive}: no such profile file")
            replan = AdaptiveConfig(
                args.adaptive, args.ttft_slo, args.tpot_slo, args.replan_interval,
                args.replan_margin, args.replan_dwell, chunk=args.replan_chunk,
                load=args.replan_load, step_overhead=args.replan_step_overhead,
            )  # fmt: skip
            config = dataclasses.replace(config, adaptive=replan, live_window=args.live_window)
        workload = build_workload(workload_spec(args, args.rate), tokenizer_for(args.model))
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(flag_message(ValueError(str(e).strip("'\"")), parser))
    summary, _ = simulate(config, workload, args.ttft_slo, args.tpot_slo, args.output)
    print(json.dumps(json_safe(summary), indent=1))
    return 0
