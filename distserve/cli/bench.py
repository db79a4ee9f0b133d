"""`distserve bench` (one workload at one rate) and `distserve goodput` (a sweep of
rates): load against a live OpenAI-compatible server, results as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from distserve.cli.common import (
    add_arrival_flags,
    add_slo_flags,
    add_tokenizer_flag,
    add_workload_flags,
    workload_spec,
)
from distserve.cli.values import flag_message, json_safe, positive_int


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def _add_common(p: argparse.ArgumentParser, sweep: bool) -> None:
    """The flags bench and goodput share: the server, the workload, the targets. A sweep
    (goodput) takes its rates from --rates and has an attainment --target."""
    p.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="server root, without /v1 (default: http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("DISTSERVE_API_KEY"),
        help="bearer key for the server (default: $DISTSERVE_API_KEY)",
    )
    add_tokenizer_flag(p, None)
    add_workload_flags(p, num_requests=100, sessions=True)
    add_arrival_flags(p, rate=not sweep, sessions=True)
    add_slo_flags(p, attainment="--target" if sweep else None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--label",
        default=None,
        help="name of the server's layout in progress bars, results and plots (default: "
        "what its /health says, e.g. 1P1D or colocated x2)",
    )


def add_parsers(verbs: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    bench = verbs.add_parser(
        "bench",
        help="measure SLO attainment of a workload at one rate",
        description="Replay a workload against a server at one arrival rate; print and save "
        "SLO attainment and latencies.",
    )
    _add_common(bench, sweep=False)
    bench.add_argument("--output", default=None, help="write {config, summary, requests} JSON here")
    good = verbs.add_parser(
        "goodput",
        help="find the goodput: the highest rate meeting the SLO",
        description="Run a workload at several rates and report the highest rate at which SLO "
        "attainment stays >= the target.",
    )
    _add_common(good, sweep=True)
    good.add_argument(
        "--rates",
        type=_rates,
        required=True,
        help="comma-separated request rates to try, e.g. 0.5,1,2",
    )
    good.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="devices (cores or GPUs) the server uses, for per-device goodput (default: 1)",
    )
    good.add_argument("--output-dir", default=None, help="directory for each rate's results file")
    good.add_argument("--output", default=None, help="write the sweep summary JSON here")
    good.add_argument(
        "--plot", default=None, metavar="PNG", help="plot attainment against rate here"
    )
    return bench, good


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio

    import httpx

    from distserve.bench.run import bench_once, goodput_sweep

    if args.dataset == "trace" and not args.trace:
        parser.error("--dataset trace needs --trace FILE")
    if getattr(args, "plot", None):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib: pip install 'distserve[bench]'")
    try:
        spec = workload_spec(args, rate=getattr(args, "rate", 1.0))
    except ValueError as e:
        parser.error(flag_message(e, parser))
    progress = not args.no_progress
    try:
        if args.verb == "bench":
            summary, _ = asyncio.run(
                bench_once(
                    args.base_url,
                    spec,
                    args.ttft_slo,
                    args.tpot_slo,
                    args.model,
                    args.api_key,
                    args.output,
                    progress,
                    label=args.label,
                )
            )
            print(json.dumps(json_safe(summary), indent=1))
            return 0
        sweep = asyncio.run(
            goodput_sweep(
                args.base_url,
                spec,
                args.rates,
                args.ttft_slo,
                args.tpot_slo,
                args.target,
                args.devices,
                args.model,
                args.api_key,
                args.output_dir,
                progress,
                label=args.label,
            )
        )
    except (OSError, ValueError, httpx.HTTPError) as e:  # no server, bad model, bad trace ...
        print(f"distserve {args.verb}: error: {e} (server {args.base_url})", file=sys.stderr)
        return 1
    print(json.dumps(json_safe({k: v for k, v in sweep.items() if k != "runs"}), indent=1))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(json_safe(sweep), f, indent=1)
    if args.plot:
        from distserve.bench.plots import attainment_vs_x

        layout = sweep["layout"]
        attainment_vs_x(
            {layout: sweep["points"]},
            "request rate (req/s)",
            args.plot,
            args.target,
            title=plot_title(sweep),
            goodputs={layout: sweep["goodput"]},
        )
    return 0


def plot_title(sweep: dict[str, Any]) -> str:
    """What a goodput plot measured: the dataset and the targets."""
    slo = sweep["slo"]
    return (
        f"{sweep['dataset']}: SLO TTFT {slo['ttft']:g} s, TPOT {slo['tpot']:g} s, "
        f"{100 * sweep['target']:g}% attainment"
    )
