"""`distserve profile`: fit a latency profile of a model on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distserve.cli.common import add_engine_flags
from distserve.cli.values import flag_message, positive_int

if TYPE_CHECKING:
    from distserve.config import EngineConfig
    from distserve.core import StepPlan


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
        help="tensor parallel degree: the instance's workers split --cores (default: 1)",
    )
    p.add_argument(
        "--pp",
        type=positive_int,
        default=1,
        help="pipeline stages: times one pass through all of them (default: 1)",
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
        check_shape(args, parser)
        prof = profile_model(
            config, args.cores, args.quick, not args.no_progress, args.tp, args.pp,
            parallel_instance,
        )  # fmt: skip
    except ValueError as e:
        parser.error(flag_message(e, parser))
    save_profiles(args.output, [prof])
    summary = {k: v for k, v in prof.to_dict().items() if k != "fit"}
    summary["fit_error"] = {k: prof.fit[k] for k in ("prefill", "decode")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def check_shape(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse a --tp/--pp the model cannot be split into, naming the flags."""
    if args.tp == args.pp == 1:
        return
    from distserve.model.metadata import config_of
    from distserve.model.parallel import check_parallel
    from distserve.model.registry import resolve

    source = resolve(args.model, args.load_format)
    try:
        check_parallel(source.config or config_of(source), args.tp, args.pp)
    except ValueError as e:
        parser.error(f"--tp {args.tp} / --pp {args.pp}: {e}")


def parallel_instance(
    config: EngineConfig, cores: list[int], tp: int, pp: int
) -> tuple[Callable[[StepPlan], Any], Any, Callable[[], None]]:
    """(execute, info, close) of a tp x pp instance as `serve` runs it: Ray workers
    sharing `cores`; steps go to its first pipeline slot, one at a time."""
    import asyncio

    from distserve.cluster.placement import init_ray, start_executor

    init_ray(None, max(8, tp * pp))
    loop = asyncio.new_event_loop()
    slots = loop.run_until_complete(start_executor(config, cores, "profile", True, tp, pp))
    info = loop.run_until_complete(slots[0].info())

    def execute(plan: StepPlan) -> Any:
        return loop.run_until_complete(slots[0].execute(plan))

    def close() -> None:
        for s in slots:
            loop.run_until_complete(s.close())
        loop.close()

    return execute, info, close
