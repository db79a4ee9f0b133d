"""Values in and out of the verbs: argparse types that check a flag's text, the message that
names a flag for a config error, and JSON-safe output. The flag groups are in `common.py`."""

from __future__ import annotations

import argparse
import math
from typing import Any


def flag_message(error: ValueError, parser: argparse.ArgumentParser) -> str:
    """A config error ('kv_cache_gb must be > 0, ...') with its field named as the flag
    that sets it, when there is one."""
    text = str(error)
    field = text.split(" ", 1)[0]
    flag = "--" + field.replace("_", "-")
    known = {opt for action in parser._actions for opt in action.option_strings}  # noqa: SLF001
    return f"{flag}: {text}" if flag in known else text


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def multiple(text: str) -> float:
    """A factor >= 1."""
    v = positive_float(text)
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v}")
    return v


def length_range(text: str) -> tuple[int, int]:
    """LO,HI with 1 <= LO <= HI; a single N means N,N."""
    parts = text.split(",")
    try:
        lo, hi = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or N), got {text!r}") from None
    if len(parts) > 2 or not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


def share(text: str) -> float:
    """A share of requests in (0, 1], such as an attainment target."""
    v = positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def json_safe(x: Any) -> Any:
    """JSON has no infinity (an `inf` rate, an unbounded goodput): write it as a string."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x
