"""serve's flags for per-phase parallelism (runtime/parallel_executor.py), the live view,
adaptive re-planning and the per-request rule (cluster/live.py, cluster/adaptive.py,
cluster/decode_prefill.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from distserve.cli.values import (
    multiple,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from distserve.cluster.adaptive import AdaptiveConfig
    from distserve.cluster.decode_prefill import DecodePrefillConfig


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-phase parallelism")
    for role in ("prefill", "decode"):
        for kind, name in (("tp", "tensor parallel degree"), ("pp", "pipeline stages")):
            g.add_argument(
                f"--{role}-{kind}",
                type=positive_int,
                default=1,
                help=f"{name} of {role} instances"
                + (" (and colocated ones)" if role == "prefill" else "")
                + ": that many workers, each with its own cores or device (default: 1)",
            )


def add_live_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live view and adaptive layout")
    g.add_argument(
        "--ttft-slo",
        type=positive_float,
        default=None,
        help="TTFT target (s): /metrics reports the live window's attainment against it",
    )
    g.add_argument(
        "--tpot-slo",
        type=positive_float,
        default=None,
        help="TPOT target (s): /metrics reports the live window's attainment against it",
    )
    g.add_argument(
        "--live-window",
        type=positive_float,
        default=120.0,
        help="seconds of traffic the live view keeps (default: 120)",
    )
    g.add_argument(
        "--adaptive",
        default=None,
        metavar="PROFILE",
        help="follow the traffic: re-plan the layout of the instances on the live window "
        "with this latency profile JSON and flip roles to the best one (needs --ttft-slo "
        "and --tpot-slo)",
    )
    add_replan_flags(g)


def add_decode_prefill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-request prefill on decode")
    g.add_argument(
        "--prefill-on-decode",
        action="store_true",
        help="disagg: a decode instance prefills a new prompt itself (no KV migration) when "
        "the latency model says it would be decoding sooner than behind the prefill queue "
        "plus the migration, and the step stays within --tpot-slo (so long prompts always "
        "go to prefill; needs --tpot-slo; default: off)",
    )
    g.add_argument(
        "--prefill-on-decode-profile",
        default=None,
        metavar="PROFILE",
        help="--prefill-on-decode: latency profile JSON of the instances (default: the "
        "emulated devices' with --emulate, else --adaptive's)",
    )


def decode_prefill_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> DecodePrefillConfig | None:
    """The per-request rule's settings, or None without --prefill-on-decode."""
    if not args.prefill_on_decode:
        return None
    import os

    from distserve.cluster.decode_prefill import DecodePrefillConfig
    from distserve.sim.profile import BUNDLED

    if args.mode != "disagg":
        parser.error("--prefill-on-decode applies to --mode disagg only")
    if args.tpot_slo is None:
        parser.error("--prefill-on-decode needs --tpot-slo (the longest step a decode "
                     "instance may take to prefill a prompt)")  # fmt: skip
    profile = args.prefill_on_decode_profile or (None if args.emulate else args.adaptive)
    if profile is None and not args.emulate:
        parser.error("--prefill-on-decode needs --prefill-on-decode-profile PROFILE "
                     "(or --emulate, or --adaptive PROFILE)")  # fmt: skip
    if profile is not None and profile not in BUNDLED and not os.path.isfile(profile):
        parser.error(f"--prefill-on-decode-profile {profile}: no such profile file")
    return DecodePrefillConfig(args.tpot_slo, profile)


def adaptive_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> AdaptiveConfig | None:
    """The re-planning settings, or None without --adaptive; errors name the flag."""
    if args.adaptive is None:
        return None
    import os

    from distserve.cluster.adaptive import AdaptiveConfig

    if args.ttft_slo is None or args.tpot_slo is None:
        parser.error("--adaptive needs --ttft-slo and --tpot-slo (the targets it plans for)")
    from distserve.sim.profile import BUNDLED

    if args.adaptive not in BUNDLED and not os.path.isfile(args.adaptive):
        parser.error(f"--adaptive {args.adaptive}: no such profile file (or {', '.join(BUNDLED)})")
    if args.mode == "colocated" and args.chunked_prefill:
        parser.error("--adaptive starts unchunked: it turns chunked prefill on itself "
                     "(--replan-chunk)")  # fmt: skip
    try:
        return AdaptiveConfig(
            args.adaptive, args.ttft_slo, args.tpot_slo, args.replan_interval,
            args.replan_margin, args.replan_dwell, chunk=args.replan_chunk,
            load=args.replan_load, step_overhead=args.replan_step_overhead,
        )  # fmt: skip
    except ValueError as e:
        parser.error(f"--replan-*: {e}")
    return None


def add_replan_flags(g: Any) -> None:
    """--replan-interval/-margin/-dwell/-chunk/-load/-step-overhead, as serve and simulate
    take them."""
    g.add_argument(
        "--replan-interval",
        type=positive_float,
        default=20.0,
        help="--adaptive: seconds between re-plans (default: 20)",
    )
    g.add_argument(
        "--replan-margin",
        type=nonnegative_float,
        default=0.05,
        help="--adaptive: predicted attainment gain a new layout needs (default: 0.05)",
    )
    g.add_argument(
        "--replan-dwell",
        type=nonnegative_float,
        default=30.0,
        help="--adaptive: seconds a better layout must stay best before flipping (default: 30)",
    )
    g.add_argument(
        "--replan-chunk",
        type=nonnegative_int,
        default=512,
        help="--adaptive: colocated instances may turn chunked prefill on, with this token "
        "budget a step, when re-plans predict it best (0: never; default: 512)",
    )
    g.add_argument(
        "--replan-load",
        type=multiple,
        default=1.2,
        help="--adaptive: re-plans predict each layout on the window's requests arriving this "
        "many times faster (>= 1; 1: as they came), so that a layout at the edge of its "
        "capacity is judged by the collapse a little more traffic brings (default: 1.2)",
    )
    g.add_argument(
        "--replan-step-overhead",
        type=nonnegative_float,
        default=None,
        metavar="SECONDS",
        help="--adaptive: seconds outside the model each step of a predicted layout takes "
        "(default: the deployment's: serve measures it from its instances' back-to-back "
        "steps since the last re-plan; simulate takes its serving path's --step-overhead)",
    )
