"""The serving path: what a served step costs beyond the profile's model time. One frozen
object that calibration and trace fits produce, plans record, the CLI builds from its
flags, and the latency model reads."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _knob(default: float | None, bound: str, help: str, unset: str | None = None) -> Any:
    """A field of ServingPath: its default, the bound its value must meet ('>= 0' or
    '> 0'), its help, and what None means (only for knobs that may be None)."""
    return field(default=default, metadata={"bound": bound, "help": help, "unset": unset})


@dataclass(frozen=True)
class ServingPath:
    """How a served instance's steps and KV migrations differ from the profile's.

    A step costs the profile's model time stretched by a scale (`compute_scale` for its
    prompt part, `decode_scale` for its decode part: a served decode step leaves its caches
    to the round trip between steps, a long prefill hardly notices), plus
    `decode_seq_time` per decode request beyond the first (on the EPYC a served decode
    step of 3 requests ran 1.15-1.3x the profile, of 1 request 0.95-1.1x), plus
    `step_overhead` outside the model. On a CPU host the scales move with the other
    instances' load: with contended scales, the simulator interpolates towards them by the
    share of the other instances in a decode step when a step starts (their streamed
    tokens keep the frontend busy on the same cores). A migration costs
    `transfer_overhead` plus its KV bytes over `transfer_bandwidth`.

    Written as a dict (`to_dict`) into plan files and benchmark results; `from_dict`
    reads those back."""

    step_overhead: float = _knob(
        0.0,
        ">= 0",
        "seconds each step spends outside the model: the controller's round trip to the "
        "worker, sampling, streaming; bench/calibrate.py measures it",
    )
    compute_scale: float = _knob(
        1.0,
        "> 0",
        "model time when serving over model time when profiled, e.g. 1.1 where the API server "
        "shares the workers' cores",
    )
    decode_scale: float | None = _knob(
        None,
        "> 0",
        "the same for decode steps alone, where a served decode step slows more than a prefill",
        unset="the compute scale",
    )
    contended_scale: float | None = _knob(
        None,
        "> 0",
        "prefill's scale while every other instance is in a decode step, whose streamed tokens "
        "keep the frontend busy: for CPU cores sharing one host; bench/calibrate.py measures it",
        unset="no contention modelled",
    )
    contended_decode_scale: float | None = _knob(
        None,
        "> 0",
        "decode's scale while every other instance is in a decode step",
        unset="no contention modelled",
    )
    decode_seq_time: float = _knob(
        0.0,
        ">= 0",
        "seconds each decode request of a step adds beyond the first, on top of the scaled "
        "profile: served steps pay per request more than the profiler's isolated steps; "
        "sim/trace_fit.py measures it",
    )
    transfer_bandwidth: float | None = _knob(
        None,
        "> 0",
        "KV migration bytes/s",
        unset="the profile's, else 1e10",
    )
    transfer_overhead: float = _knob(0.0, ">= 0", "fixed seconds per KV migration: round trips")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["unset"] is not None:
                continue
            zero_ok = f.metadata["bound"] == ">= 0"
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and not zero_ok)
            ):
                raise ValueError(f"{f.name} must be a number {f.metadata['bound']}, got {value!r}")

    @property
    def contended(self) -> bool:
        """Whether a step's time depends on what the other instances are doing."""
        return self.contended_scale is not None or self.contended_decode_scale is not None

    def factors(self, busy_share: float = 0.0) -> tuple[float, float]:
        """(prefill, decode) scales with `busy_share` of the other instances busy."""
        p = self.compute_scale
        d = self.compute_scale if self.decode_scale is None else self.decode_scale
        if busy_share > 0:
            if self.contended_scale is not None:
                p += (self.contended_scale - p) * busy_share
            if self.contended_decode_scale is not None:
                d += (self.contended_decode_scale - d) * busy_share
        return p, d

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: ServingPath | None = None) -> ServingPath:
        """The serving path a dict gives (`to_dict`'s, a plan file's `serving_path` without
        its per-layout entries, a flag's JSON): its keys over `base`'s values (default:
        every knob at its default). An unknown key is an error that names it."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown keys {unknown} (known: {', '.join(known)})")
        return dataclasses.replace(base or cls(), **d)
