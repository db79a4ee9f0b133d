"""`distserve serve`: instances on Ray behind the OpenAI-compatible API."""

from __future__ import annotations

import argparse
from typing import Any

from distserve.cli.common import add_engine_flags, add_placement_flags, add_prefix_caching_flag
from distserve.cli.emulation import add_emulation_flags, emulation_config
from distserve.cli.live_flags import (
    adaptive_config,
    add_decode_prefill_flags,
    add_live_flags,
    add_parallel_flags,
    decode_prefill_config,
)
from distserve.cli.values import flag_message, nonnegative_float, positive_float, positive_int
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
        help="interface to bind (default: 127.0.0.1, this machine only; on a loopback address "
        "the embedded Ray cluster listens on loopback only too)",
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
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a connection may take to send a request's head; then 408 and closed "
        "(default: 10)",
    )
    srv.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a request's body may take after its head; then 408 and closed (default: 30)",
    )
    srv.add_argument(
        "--orphan-timeout",
        type=positive_float,
        default=300.0,
        help="seconds a request may wait while every instance of a role it needs is down "
        "and restarting; then it ends with an error (default: 300)",
    )
    srv.add_argument(
        "--degrade-after",
        type=positive_float,
        default=10.0,
        help="disagg: seconds a role may have no live instance before the other role's "
        "instances serve requests end to end, until it is back (default: 10)",
    )
    srv.add_argument(
        "--no-degraded-mode",
        action="store_true",
        help="never cover for a missing role: its requests wait (up to --orphan-timeout)",
    )
    srv.add_argument(
        "--max-connections",
        type=positive_int,
        default=1024,
        help="open HTTP connections; requests beyond them get 503 (default: 1024)",
    )
    srv.add_argument(
        "--api-servers",
        type=int,
        default=0,
        metavar="N",
        help="HTTP API processes apart from the controller's: they parse requests, tokenize "
        "and stream every token, so that work leaves the event loop that runs the instances "
        "(default: 0, the API runs in the controller's process)",
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
    srv.add_argument(
        "--kv-store-gb",
        type=nonnegative_float,
        default=0.0,
        metavar="GIB",
        help="host memory for the KV store, which every step writes its new KV to, so that "
        "a dead decode instance's requests resume from it without a new prefill (0: none)",
    )
    srv.add_argument(
        "--kv-store-disk-gb",
        type=positive_float,
        default=0.0,
        metavar="GIB",
        help="disk for the KV store's evicted prefix blocks: a block pushed out of the store's "
        "memory is written to a spill file, and a later prompt with that prefix reads it back "
        "instead of computing it (needs --kv-store-gb; default: no disk tier)",
    )
    srv.add_argument(
        "--kv-store-disk-dir",
        default=None,
        metavar="DIR",
        help="directory of the spill file (default: $TMPDIR or /tmp); the file is unlinked "
        "once open, so nothing is left there when the server ends, killed or not",
    )
    add_engine_flags(srv)
    add_prefix_caching_flag(srv)
    add_parallel_flags(srv)
    add_emulation_flags(srv)
    add_live_flags(srv)
    add_decode_prefill_flags(srv)
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
            apply_plan(args, plan_placement(args.plan, emulated=bool(args.emulate)))
        except (OSError, ValueError) as e:
            parser.error(f"--plan {args.plan}: {e}")
    if args.emulate and args.ray_address:
        parser.error(
            "--ray-address: emulated devices run in the controller's process, not as Ray "
            "actors; lay them out on emulated nodes with --nodes and --devices-per-node"
        )
    if not args.emulate:  # an emulated model needs no weights
        try:
            source = resolve(args.model, args.load_format)
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"--model {args.model}: {e}")
        check_shapes(args, parser, source)
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
            cache=CacheConfig(kv_cache_gb=args.kv_cache_gb, prefix_caching=args.prefix_caching),
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
            prefill_tp=args.prefill_tp,
            prefill_pp=args.prefill_pp,
            decode_tp=args.decode_tp,
            decode_pp=args.decode_pp,
            emulated=bool(args.emulate),
        )
        emulation = emulation_config(args)
        if emulation is not None:  # the profile has the model and shapes, the nodes hold them
            from distserve.cluster.emulation import EmulatedCluster

            EmulatedCluster(engine, placement, emulation)
        server = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("DISTSERVE_API_KEY"),
            ray_address=args.ray_address,
            use_ray=not args.no_ray,
            transport=args.transport,
            max_queued=args.max_queued,
            max_body_mb=args.max_body_mb,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
            trace_steps=args.trace_steps,
            orphan_timeout=args.orphan_timeout,
            ttft_slo=args.ttft_slo,
            tpot_slo=args.tpot_slo,
            live_window=args.live_window,
            degrade_after=None if args.no_degraded_mode else args.degrade_after,
            kv_store_gb=args.kv_store_gb,
            kv_store_disk_gb=args.kv_store_disk_gb,
            kv_store_disk_dir=args.kv_store_disk_dir,
            prefill_on_decode=decode_prefill_config(args, parser),
            api_servers=args.api_servers,
        )
    except ValueError as e:
        parser.error(flag_message(e, parser))
    if args.kv_store_disk_gb and not args.prefix_caching:
        parser.error("--kv-store-disk-gb: the disk tier keeps prefixes: drop --no-prefix-caching")
    adaptive = adaptive_config(args, parser)
    asyncio.run(serve(engine, placement, server, emulation, adaptive))
    return 0


def check_shapes(args: argparse.Namespace, parser: argparse.ArgumentParser, source: Any) -> None:
    """Refuse tensor/pipeline degrees the model cannot be split into, naming the flag."""
    from distserve.model.metadata import config_of
    from distserve.model.parallel import check_parallel

    shapes = [("--prefill-tp", "--prefill-pp", args.prefill_tp, args.prefill_pp)]
    if args.mode == "disagg":
        shapes.append(("--decode-tp", "--decode-pp", args.decode_tp, args.decode_pp))
    if all(tp == pp == 1 for _, _, tp, pp in shapes):
        return
    cfg = source.config or config_of(source)
    for tp_flag, pp_flag, tp, pp in shapes:
        try:
            check_parallel(cfg, tp, pp)
        except ValueError as e:
            parser.error(f"{tp_flag} {tp} / {pp_flag} {pp}: {e}")


def plan_placement(path: str, emulated: bool = False) -> dict[str, object]:
    """The serve flags a plan file stands for (with `emulated`, the plan's nodes too)."""
    from distserve.planner.plan import read_plan

    plan = read_plan(path)
    placement = plan["placement"]
    shapes = [placement.get(k) for k in ("prefill", "decode", "colocated")]
    cores = {s["cores"] for s in shapes if s}
    if len(cores) > 1:
        raise ValueError(
            f"the plan gives prefill and decode instances different core counts "
            f"{sorted(cores)}; serve takes one --cores-per-instance"
        )
    flags: dict[str, object] = {"cores_per_instance": next(iter(cores)) if cores else None}
    if placement.get("colocated"):
        shape = placement["colocated"]
        flags |= {
            "mode": "colocated",
            "instances": shape["instances"],
            "chunked_prefill": bool(placement.get("chunked_prefill")),
            "prefill_tp": shape["tp"],
            "prefill_pp": shape["pp"],
        }
    else:
        prefill, decode = placement["prefill"], placement["decode"]
        flags |= {
            "mode": "disagg",
            "prefill_instances": prefill["instances"],
            "decode_instances": decode["instances"],
            "chunked_prefill": False,
            "prefill_tp": prefill["tp"],
            "prefill_pp": prefill["pp"],
            "decode_tp": decode["tp"],
            "decode_pp": decode["pp"],
        }
    if emulated and "cluster" in plan:
        flags["nodes"] = plan["cluster"]["num_nodes"]
        flags["devices_per_node"] = plan["cluster"]["devices_per_node"]
    flags["model"] = plan.get("model")
    return flags


def apply_plan(args: argparse.Namespace, flags: dict[str, object]) -> None:
    from distserve.model.registry import ARCHITECTURES

    model = flags.pop("model")
    if model in ARCHITECTURES and model != args.model:
        args.model = model
    for k, v in flags.items():
        if k in ("nodes", "devices_per_node") and getattr(args, k) is not None:
            continue  # given on the command line: it wins over the plan's cluster
        setattr(args, k, v)
    print(f"deploying plan: {flags}", flush=True)
