"""`distserve serve`: instances on Ray behind the OpenAI-compatible API."""

from __future__ import annotations

import argparse
from typing import Any

from distserve.cli.common import (
    add_engine_flags,
    add_placement_flags,
    flag_message,
    positive_int,
)
from distserve.config import TRANSPORTS


def add_parser(verbs: Any) -> argparse.ArgumentParser:
    srv = verbs.add_parser(
        "serve",
        help="serve the OpenAI API with disaggregated or colocated instances",
        description="Start instances (Ray actors) and an OpenAI-compatible HTTP server; "
        "prints the URL when ready.",
    )
    add_placement_flags(srv)
    srv.add_argument(
        "--cores-per-instance",
        type=positive_int,
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
        type=positive_int,
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
    srv.add_argument(
        "--max-queued",
        type=positive_int,
        default=512,
        help="prompts waiting for prefill before new requests get 429 + Retry-After (default: 512)",
    )
    srv.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        help="largest request body in MiB; larger ones get 413 (default: 8)",
    )
    srv.add_argument(
        "--plan",
        default=None,
        metavar="FILE",
        help="deploy a plan written by `distserve plan` (sets mode, instance counts, cores)",
    )
    srv.add_argument(
        "--trace-steps",
        default=None,
        metavar="FILE",
        help="append one JSON line per instance step (what ran, how long) to FILE",
    )
    add_engine_flags(srv)
    return srv  # type: ignore[no-any-return]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio
    import os

    from distserve.config import EngineConfig, PlacementConfig
    from distserve.core import CacheConfig, SchedulerConfig
    from distserve.model.registry import resolve
    from distserve.server.launch import ServerConfig, serve

    if args.plan:
        try:
            apply_plan(args, plan_placement(args.plan))
        except (OSError, ValueError) as e:
            parser.error(f"--plan {args.plan}: {e}")
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
            max_queued=args.max_queued,
            max_body_mb=args.max_body_mb,
            trace_steps=args.trace_steps,
        )
    except ValueError as e:
        parser.error(flag_message(e, parser))
    asyncio.run(serve(engine, placement, server))
    return 0


def plan_placement(path: str) -> dict[str, object]:
    """The serve flags a plan file stands for; raises ValueError for a plan the runtime
    cannot deploy yet (tensor or pipeline parallelism inside an instance)."""
    from distserve.planner.plan import read_plan

    plan = read_plan(path)
    placement = plan["placement"]
    shapes = [placement.get(k) for k in ("prefill", "decode", "colocated")]
    for shape in (s for s in shapes if s):
        if shape["tp"] > 1 or shape["pp"] > 1:
            raise ValueError(
                f"the plan needs tp={shape['tp']}, pp={shape['pp']} inside an instance; the "
                "runtime has no tensor or pipeline parallelism yet (re-plan with tp/pp 1 profiles)"
            )
    cores = {s["cores"] for s in shapes if s}
    if len(cores) > 1:
        raise ValueError(
            f"the plan gives prefill and decode instances different core counts "
            f"{sorted(cores)}; serve takes one --cores-per-instance"
        )
    flags: dict[str, object] = {"cores_per_instance": next(iter(cores)) if cores else None}
    if placement.get("colocated"):
        flags |= {
            "mode": "colocated",
            "instances": placement["colocated"]["instances"],
            "chunked_prefill": bool(placement.get("chunked_prefill")),
        }
    else:
        flags |= {
            "mode": "disagg",
            "prefill_instances": placement["prefill"]["instances"],
            "decode_instances": placement["decode"]["instances"],
            "chunked_prefill": False,
        }
    flags["model"] = plan.get("model")
    return flags


def apply_plan(args: argparse.Namespace, flags: dict[str, object]) -> None:
    from distserve.model.registry import ARCHITECTURES

    model = flags.pop("model")
    if model in ARCHITECTURES and model != args.model:
        args.model = model
    for k, v in flags.items():
        setattr(args, k, v)
    print(f"deploying plan: {flags}", flush=True)
