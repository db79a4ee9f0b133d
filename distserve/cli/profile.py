"""`distserve profile`: fit a latency profile of a model on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from distserve.cli.common import add_engine_flags
from distserve.cli.values import flag_message, positive_int


def add_parser(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        "profile",
        help="measure the model runner and fit a latency profile",
        description="Time prefill batches and decode steps of the real runner on a grid of "
        "shapes (warm-up excluded) and fit the paper's latency formulas; write a profile the "
        "simulator and planner read.",
    )
    p.add_argument(
        "--cores",
        type=positive_int,
        default=1,
        help="CPU cores the profiled instance owns (default: 1)",
    )
    p.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        help="tensor parallel degree (only 1 is supported so far)",
    )
    p.add_argument("--output", required=True, help="profile JSON to write")
    p.add_argument(
        "--quick", action="store_true", help="a small grid (seconds, not minutes): for smoke tests"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_flags(p)
    return p  # type: ignore[no-any-return]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from distserve.config import EngineConfig
    from distserve.core import CacheConfig, SchedulerConfig
    from distserve.planner.profile import profile_model
    from distserve.sim.profile import save_profiles

    if args.tp != 1:
        parser.error("--tp: the runtime has no tensor parallelism yet; profile with --tp 1")
    try:
        config = EngineConfig(
            model=args.model,
            load_format=args.load_format,
            dtype=args.dtype,
            device=args.device,
            cache=CacheConfig(kv_cache_gb=args.kv_cache_gb),
            scheduler=SchedulerConfig(
                max_model_len=args.max_model_len,
                max_num_batched_tokens=max(4096, args.max_model_len),
            ),
        )
        prof = profile_model(config, args.cores, args.quick, not args.no_progress)
    except ValueError as e:
        parser.error(flag_message(e, parser))
    save_profiles(args.output, [prof])
    summary = {k: v for k, v in prof.to_dict().items() if k != "fit"}
    summary["fit_error"] = {k: prof.fit[k] for k in ("prefill", "decode")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
