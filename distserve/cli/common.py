"""Flag helpers shared by the verbs."""

from __future__ import annotations

import argparse

from distserve.model.registry import DEFAULT_MODEL


def flag_message(error: ValueError, parser: argparse.ArgumentParser) -> str:
    """A config error ('kv_cache_gb must be > 0, ...') with its field named as the flag
    that sets it, when there is one."""
    text = str(error)
    field = text.split(" ", 1)[0]
    flag = "--" + field.replace("_", "-")
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    return f"{flag}: {text}" if flag in known else text


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v}")
    return v


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered model name, HF directory or .gguf file (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "random"],
        help="auto: the model's own weights; random: random weights of its shape",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="compute and KV-cache dtype (default: bfloat16)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:n] (default: cpu)")
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=1.0,
        help="memory for the KV cache in GiB (default: 1.0)",
    )
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        default=2048,
        help="longest prompt + output in tokens (default: 2048)",
    )


def add_serving_path_scale_flags(p: argparse.ArgumentParser) -> None:
    """How much slower the model runs when served than when profiled (simulate, plan)."""
    p.add_argument(
        "--compute-scale",
        type=positive_float,
        default=1.0,
        help="model time when serving over model time when profiled, e.g. 1.1 where the "
        "API server shares the workers' cores (default: 1)",
    )
    p.add_argument(
        "--decode-scale",
        type=positive_float,
        default=None,
        help="the same for decode steps alone, where a served decode step slows more than "
        "a prefill (default: --compute-scale)",
    )
    p.add_argument(
        "--contended-scale",
        type=positive_float,
        default=None,
        help="prefill's scale while every other instance is in a decode step (its streamed "
        "tokens keep the frontend busy), for CPU cores sharing one host (bench/calibrate.py "
        "measures it; default: no contention modelled)",
    )
    p.add_argument(
        "--contended-decode-scale",
        type=positive_float,
        default=None,
        help="decode's scale while every other instance is in a decode step (default: none)",
    )
    p.add_argument(
        "--decode-seq-time",
        type=nonnegative_float,
        default=0.0,
        help="seconds each decode request of a step adds beyond the first, on top of the "
        "scaled profile: served steps pay per request more than the profiler's isolated "
        "steps (bench/calibrate.py measures it; default: 0)",
    )
