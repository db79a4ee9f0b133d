"""`distserve plan`: search the placement that maximizes goodput per device."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from distserve.cli.common import (
    add_prefix_caching_flag,
    add_serving_path_flags,
    add_slo_flags,
    add_workload_flags,
    serving_path,
    serving_path_json,
    workload_spec,
)
from distserve.cli.values import flag_message, json_safe, positive_float, positive_int
from distserve.sim.serving_path import ServingPath

if TYPE_CHECKING:
    from distserve.planner.phases import Setting


def add_parser(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser(
        "plan",
        help="find the placement with the best goodput per device",
        description="Search prefill/decode placements (the DistServe paper's Algorithm 1 or 2) "
        "and the colocated baselines with the simulator; write a plan `serve --plan` deploys.",
    )
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        help="profile JSON, or 'a100' / 'a100-vllm' for the bundled paper profiles; repeat "
        "for several shapes (e.g. 1-core and 2-core CPU profiles)",
    )
    p.add_argument(
        "--profile-baseline",
        action="append",
        default=None,
        help="profiles of the colocated baselines' engine (the paper compares with vLLM: "
        "'a100-vllm'); default: --profile",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model to plan for when a profile file holds several (e.g. opt-13b, opt-66b)",
    )
    p.add_argument(
        "--profile-decode",
        action="append",
        default=None,
        help="profiles for decode instances (another device kind); default: --profile",
    )
    p.add_argument(
        "--num-nodes", type=positive_int, default=1, help="nodes in the cluster (default: 1)"
    )
    p.add_argument(
        "--devices-per-node", type=positive_int, required=True, help="GPUs (or CPU cores) per node"
    )
    add_workload_flags(p, num_requests=400)
    add_slo_flags(p, attainment="--attainment")
    p.add_argument(
        "--affinity",
        default="high",
        choices=["high", "low"],
        help="high: KV moves fast anywhere (Algorithm 1); low: prefill and decode of a "
        "stage share a node (Algorithm 2)",
    )
    p.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="target request rate: replicate enough to serve it (default: fill the cluster)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=128,
        help="scheduler batch limit in the simulations (default: 128)",
    )
    # the planner's KV migrations run at 10 GB/s unless told: profiles do not say
    add_serving_path_flags(p, defaults={"transfer_bandwidth": 1e10})
    add_prefix_caching_flag(p)  # the paper's systems had none: its comparisons want it off
    p.add_argument(
        "--baseline-serving-path",
        default=None,
        metavar="JSON",
        help="the colocated baselines' own serving path, calibrated on a colocated server: "
        "a JSON object (or a file holding one) with any of "
        f"{', '.join(f.name for f in dataclasses.fields(ServingPath))}; the rest as the flags "
        "above (default: the flags above)",
    )
    p.add_argument(
        "--chunked-serving-path",
        default=None,
        metavar="JSON",
        help="the chunked-prefill baseline's own serving path, calibrated on a chunked "
        "server, in the same form (default: --baseline-serving-path)",
    )
    p.add_argument(
        "--max-pp",
        type=positive_int,
        default=None,
        help="highest pipeline degree of an instance (default: what the cluster holds; "
        "1 searches tensor parallelism only)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="parallel search processes (default: all cores)",
    )
    p.add_argument("--output", default=None, help="write the plan JSON here")
    p.add_argument("--json", action="store_true", help="print the plan JSON to stdout")
    return p  # type: ignore[no-any-return]


def _profiles(paths: list[str], model: str | None) -> list[Any]:
    from distserve.sim.profile import load_profiles

    profiles = [p for path in paths for p in load_profiles(path)]
    names = sorted({p.model for p in profiles})
    if model is None and len(names) > 1:
        raise ValueError(f"model is needed: the profiles hold {', '.join(names)}")
    chosen = [p for p in profiles if p.model == (model or names[0])]
    if not chosen:
        from distserve.model.registry import ARCHITECTURES
        from distserve.sim.derive import derive_all
        from distserve.sim.profile import a100_kv_capacity

        if model not in ARCHITECTURES:
            raise ValueError(
                f"model {model!r} is not in the profiles (they hold {', '.join(names)})"
            )
        chosen = derive_all(profiles, model, a100_kv_capacity())
        print(
            f"distserve plan: no profile of {model} in {', '.join(paths)}: derived one per tp "
            f"from {chosen[0].source.split(':')[0].removeprefix('derived ')}",
            file=sys.stderr,
        )
    return chosen


def plan_setting(args: argparse.Namespace, path: ServingPath) -> Setting:
    """What every simulation of `plan`'s search shares, from its flags (the workload:
    at least 4,000 requests, simulations take what they need)."""
    from distserve.core import SchedulerConfig
    from distserve.model.metadata import tokenizer_for
    from distserve.planner.phases import Setting
    from distserve.sim.profile import a100_kv_capacity
    from distserve.workload.build import build_workload

    spec = workload_spec(args, rate=1.0)
    workload = build_workload(
        dataclasses.replace(spec, num_requests=max(4000, spec.num_requests)),
        tokenizer_for("smollm2-135m"),
    )
    sched = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048, max_model_len=2048
    )
    return Setting(
        workload,
        args.ttft_slo,
        args.tpot_slo,
        args.attainment,
        sched,
        capacity=a100_kv_capacity(),
        path=path,
        min_requests=args.num_requests,
        prefix_caching=args.prefix_caching,
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from distserve.planner.plan import make_plan, write_plan
    from distserve.planner.search import Cluster

    path = serving_path(args, parser)
    try:
        profiles = _profiles(args.profile, args.model)
        decode = _profiles(args.profile_decode, args.model) if args.profile_decode else None
        baseline = _profiles(args.profile_baseline, args.model) if args.profile_baseline else None
        setting = plan_setting(args, path)
    except (ValueError, FileNotFoundError) as e:
        parser.error(flag_message(ValueError(str(e)), parser))
    workload = setting.workload
    kind = "cpu-core" if any(p.cores for p in profiles) else "gpu"
    cluster = Cluster(args.num_nodes, args.devices_per_node, kind)
    own: dict[str, Setting | None] = {"baseline": None, "chunked": None}
    for name in own:
        text = getattr(args, f"{name}_serving_path")
        if text is not None:
            flag = f"--{name}-serving-path"
            own[name] = dataclasses.replace(
                setting, path=serving_path_json(flag, text, path, parser)
            )
    say = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        plan = make_plan(
            setting,
            profiles,
            decode,
            cluster,
            args.affinity,
            args.rate,
            args.workers,
            say,
            workload.meta,
            baseline,
            args.max_pp,
            own["baseline"],
            own["chunked"],
        )
    except ValueError as e:
        print(f"distserve plan: error: {e}", file=sys.stderr)
        return 1
    if args.output:
        write_plan(args.output, plan)
    if args.json:
        print(json.dumps(json_safe(plan), indent=1, default=str))
    else:
        _print_summary(plan)
    return 0


def _print_summary(plan: dict[str, Any]) -> None:
    def shape(c: dict[str, Any]) -> str:
        if c.get("colocated"):
            s = c["colocated"]
            chunked = " (chunked prefill)" if c.get("chunked_prefill") else ""
            return f"{s['instances']} x colocated tp{s['tp']} pp{s['pp']}{chunked}"
        p, d = c["prefill"], c["decode"]
        return (
            f"{p['instances']} x prefill tp{p['tp']} pp{p['pp']} + "
            f"{d['instances']} x decode tp{d['tp']} pp{d['pp']}"
        )

    def line(name: str, c: dict[str, Any] | None) -> str:
        if not c:
            return f"  {name:10s} none meets the SLO"
        return (
            f"  {name:10s} {shape(c)}: {c['goodput']:.3f} req/s on {c['devices']} devices "
            f"= {c['per_device_goodput']:.3f} per device"
        )

    cl = plan["cluster"]
    print(
        f"plan for {plan['model']} on {cl['num_nodes']} x {cl['devices_per_node']} "
        f"{cl['kind']}s (search {plan['search_seconds']:.1f} s):"
    )
    print(line("disagg", plan["disagg"]))
    for k, v in plan["baselines"].items():
        print(line(k, v))
    note = f" ({plan['note']})" if plan.get("note") else ""
    print(f"recommended: {plan['recommended']}{note}")
