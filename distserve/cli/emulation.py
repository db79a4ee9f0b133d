"""`serve --emulate`'s flags: emulated devices, their nodes and links, and the tensor
and pipeline parallelism that only emulated instances have."""

from __future__ import annotations

import argparse

from distserve.cli.values import positive_float, positive_int
from distserve.config import CROSS_NODE_BANDWIDTH, NVLINK_BANDWIDTH, EmulationConfig


def add_emulation_flags(srv: argparse.ArgumentParser) -> None:
    """`EmulationConfig`'s flags, and the parallelism that only emulated instances have."""
    emu = srv.add_argument_group(
        "emulated devices",
        "--emulate PROFILE runs every instance on emulated devices: no math, the profile's "
        "step times and KV capacity for --model (e.g. --emulate a100 --model opt-13b)",
    )
    emu.add_argument(
        "--emulate",
        default=None,
        metavar="PROFILE",
        help="a100, a100-vllm (the bundled A100-80GB profiles) or a profile JSON file",
    )
    emu.add_argument(
        "--emulate-tokenizer",
        default="smollm2-135m",
        help="model whose tokenizer measures prompts, or 'bytes' (default: smollm2-135m, a "
        "byte-level BPE like OPT's)",
    )
    emu.add_argument(
        "--nodes",
        type=positive_int,
        default=None,
        help="emulated nodes (default: the plan's, or 1)",
    )
    emu.add_argument(
        "--devices-per-node",
        type=positive_int,
        default=None,
        help="emulated devices per node (default: the plan's, or 8)",
    )
    emu.add_argument(
        "--intra-node-bandwidth",
        type=positive_float,
        default=NVLINK_BANDWIDTH,
        help=f"KV migration bytes/s within a node (default: {NVLINK_BANDWIDTH:g}, NVLink 3)",
    )
    emu.add_argument(
        "--inter-node-bandwidth",
        type=positive_float,
        default=CROSS_NODE_BANDWIDTH,
        help=f"KV migration bytes/s across nodes (default: {CROSS_NODE_BANDWIDTH:g}, 25 Gbps)",
    )


def emulation_config(args: argparse.Namespace) -> EmulationConfig | None:
    """The emulation the flags ask for (None without --emulate); raises ValueError as
    `EmulationConfig` does."""
    if not args.emulate:
        return None
    return EmulationConfig(
        profile=args.emulate,
        tokenizer=args.emulate_tokenizer,
        num_nodes=args.nodes or 1,
        devices_per_node=args.devices_per_node or 8,
        intra_node_bandwidth=args.intra_node_bandwidth,
        inter_node_bandwidth=args.inter_node_bandwidth,
    )
