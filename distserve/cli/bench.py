"""`distserve bench` (one workload at one rate) and `distserve goodput` (a sweep of
rates): load against a live OpenAI-compatible server, results as JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from distserve.cli.common import flag_message, positive_float, positive_int

DATASETS = ("chatbot", "code", "summarization", "random", "fixed", "trace")


def _range(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        lo, hi = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or N), got {text!r}") from None
    if len(parts) > 2 or not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


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


def _add_common(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer measures prompts (default: the served model)",
    )
    p.add_argument(
        "--dataset",
        default="chatbot",
        choices=DATASETS,
        help="requests to send (default: chatbot = ShareGPT)",
    )
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="trace file (timestamp, prompt_len, output_len) for --dataset trace",
    )
    p.add_argument(
        "--num-requests", type=positive_int, default=100, help="requests per run (default: 100)"
    )
    p.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="coefficient of variation of arrival gaps; 1 is Poisson (default: 1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of request sampling and arrivals (default: 0)"
    )
    p.add_argument(
        "--max-prompt-len",
        type=positive_int,
        default=None,
        help="cut prompts to this many tokens (for small hardware)",
    )
    p.add_argument(
        "--max-output-len",
        type=positive_int,
        default=None,
        help="cap output lengths (for small hardware)",
    )
    p.add_argument(
        "--prompt-len",
        type=_range,
        default=(128, 512),
        help="random/fixed: prompt length LO,HI (default: 128,512)",
    )
    p.add_argument(
        "--output-len",
        type=_range,
        default=(32, 128),
        help="random/fixed: output length LO,HI (default: 32,128)",
    )
    p.add_argument(
        "--ttft-slo",
        type=positive_float,
        required=True,
        help="time-to-first-token target in seconds",
    )
    p.add_argument(
        "--tpot-slo",
        type=positive_float,
        required=True,
        help="time-per-output-token target in seconds",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(verbs: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    bench = verbs.add_parser(
        "bench",
        help="measure SLO attainment of a workload at one rate",
        description="Replay a workload against a server at one arrival rate; print and save "
        "SLO attainment and latencies.",
    )
    _add_common(bench)
    bench.add_argument(
        "--rate",
        type=positive_float,
        default=1.0,
        help="mean requests per second; inf sends all at once (default: 1)",
    )
    bench.add_argument("--output", default=None, help="write {config, summary, requests} JSON here")
    good = verbs.add_parser(
        "goodput",
        help="find the goodput: the highest rate meeting the SLO",
        description="Run a workload at several rates and report the highest rate at which SLO "
        "attainment stays >= the target.",
    )
    _add_common(good)
    good.add_argument(
        "--rates",
        type=_rates,
        required=True,
        help="comma-separated request rates to try, e.g. 0.5,1,2",
    )
    good.add_argument(
        "--target",
        type=positive_float,
        default=0.9,
        help="attainment target in (0, 1] (default: 0.9)",
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
    from distserve.workload.build import WorkloadSpec

    if args.dataset == "trace" and not args.trace:
        parser.error("--dataset trace needs --trace FILE")
    if args.verb == "goodput" and not 0 < args.target <= 1:
        parser.error(f"--target must be in (0, 1], got {args.target}")
    if getattr(args, "plot", None):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib: pip install 'distserve[bench]'")
    try:
        spec = WorkloadSpec(
            dataset=args.dataset, num_requests=args.num_requests, rate=getattr(args, "rate", 1.0),
            burstiness=args.burstiness, seed=args.seed, max_prompt_len=args.max_prompt_len,
            max_output_len=args.max_output_len, prompt_len=args.prompt_len,
            output_len=args.output_len, trace_path=args.trace,
        )  # fmt: skip
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
                )
            )
            print(json.dumps(_clean(summary), indent=1))
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
            )
        )
    except (OSError, ValueError, httpx.HTTPError) as e:  # no server, bad model, bad trace ...
        print(f"distserve {args.verb}: error: {e} (server {args.base_url})", file=sys.stderr)
        return 1
    print(json.dumps(_clean({k: v for k, v in sweep.items() if k != "runs"}), indent=1))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(_clean(sweep), f, indent=1)
    if args.plot:
        from distserve.bench.plots import attainment_vs_x

        attainment_vs_x(
            {args.base_url: sweep["points"]}, "request rate (req/s)", args.plot, args.target
        )
    return 0


def _clean(x: Any) -> Any:
    """JSON has no infinity: write it as a string."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x
