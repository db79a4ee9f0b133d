"""Latency profiles: fitted formulas for the time of a prefill batch and of a decode step
of one (model, hardware, tp, pp), as the DistServe paper models them. Times in seconds.

    prefill(batch)  = a + b * sum(l) + c * sum(l^2)            l: prompt lengths
    decode(batch)   = a + b * sum(context + 1) + c * batch      small / large-batch triples
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "profiles")
_PAPER_NAMES = {
    "facebook/opt-13b": "opt-13b",
    "facebook/opt-66b": "opt-66b",
    "facebook/opt-175b": "opt-175b",
}


@dataclass(frozen=True)
class Profile:
    """A fitted latency model of one model on one device configuration."""

    model: str
    hardware: str
    tp: int = 1
    pp: int = 1
    prefill: tuple[float, float, float] = (0.0, 0.0, 0.0)
    decode_small: tuple[float, float, float] = (0.0, 0.0, 0.0)
    decode_large: tuple[float, float, float] = (0.0, 0.0, 0.0)
    decode_threshold: int = 95
    """Batch size from which the large-batch decode triple applies."""
    kv_capacity_tokens: int | None = None
    dtype: str = "float16"
    cores: int | None = None
    source: str = ""
    """Where the numbers come from: measured (with command), the paper's files, or derived."""
    fit: dict[str, Any] = field(default_factory=dict)
    """Fit quality: median and p90 relative error per phase, sample counts."""

    def prefill_time(self, prompt_lens: Sequence[int]) -> float:
        a, b, c = self.prefill
        if not prompt_lens:
            return 0.0
        return a + b * sum(prompt_lens) + c * sum(n * n for n in prompt_lens)

    def decode_time(self, context_lens: Sequence[int]) -> float:
        """One step for a batch whose requests have these context lengths (tokens whose
        KV exists before the step)."""
        if not context_lens:
            return 0.0
        a, b, c = (
            self.decode_large if len(context_lens) >= self.decode_threshold else self.decode_small
        )
        return a + b * sum(n + 1 for n in context_lens) + c * len(context_lens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        d = dict(d)
        for k in ("prefill", "decode_small", "decode_large"):
            d[k] = tuple(d[k])
        return cls(**d)


def save_profiles(path: str, profiles: Sequence[Profile]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"profiles": [p.to_dict() for p in profiles]}, f, indent=1)


BUNDLED = {"a100": "distserve", "a100-distserve": "distserve", "a100-vllm": "vllm"}
"""Names that stand for the bundled A100 files wherever a profile path is asked for."""


def load_profiles(path: str) -> list[Profile]:
    """Our profile files ({"profiles": [...]}), the paper's coefficient files, or a bundled
    name: 'a100' (DistServe engine coefficients) or 'a100-vllm' (vLLM's)."""
    if path in BUNDLED and not os.path.exists(path):
        path = os.path.join(_DATA, f"a100-80g.{BUNDLED[path]}.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "profiles" in data:
        return [Profile.from_dict(p) for p in data["profiles"]]
    return _from_paper_file(data, os.path.basename(path))


def bundled_a100(engine: str = "distserve") -> list[Profile]:
    """The DistServe paper's A100-80GB profiles (engine 'distserve' or 'vllm')."""
    if engine not in ("distserve", "vllm"):
        raise ValueError(f"engine must be distserve or vllm, got {engine!r}")
    return load_profiles(os.path.join(_DATA, f"a100-80g.{engine}.json"))


def a100_kv_capacity() -> dict[tuple[str, int, int], int]:
    """(model, tp, pp) -> KV capacity in tokens on A100-80GB, from the paper's table."""
    out = {}
    with open(os.path.join(_DATA, "a100-80g.max_num_tokens.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[(_PAPER_NAMES.get(row["model"], row["model"]), int(row["tp"]), int(row["pp"]))] = (
                int(row["max_num_tokens"])
            )
    return out


def find(profiles: Sequence[Profile], model: str, tp: int = 1, pp: int = 1) -> Profile:
    for p in profiles:
        if p.model == model and p.tp == tp and p.pp == pp:
            return p
    have = sorted({(p.model, p.tp, p.pp) for p in profiles})
    raise KeyError(f"no profile for {model} tp={tp} pp={pp}; have {have}")


def _from_paper_file(data: dict[str, Any], name: str) -> list[Profile]:
    engine = "vllm" if "vllm" in name else "distserve"
    capacity = a100_kv_capacity()
    out = []
    for model, by_tp in data.items():
        short = _PAPER_NAMES.get(model, model)
        for tp, c in by_tp.items():
            out.append(
                Profile(
                    model=short,
                    hardware="A100-80GB",
                    tp=int(tp),
                    pp=1,
                    prefill=_seconds(c["prefill"]),
                    decode_small=_seconds(c["decoding_smallbs"]),
                    decode_large=_seconds(c["decoding_largebs"]),
                    decode_threshold=int(c["decoding_large_small_bs_threshold"]),
                    kv_capacity_tokens=capacity.get((short, int(tp), 1)),
                    source=f"DistServe paper, {engine} engine coefficients ({name})",
                )  # fmt: skip
            )
    return out


def _seconds(ms: Sequence[float]) -> tuple[float, float, float]:
    """A coefficient triple of the paper's files (milliseconds) in seconds."""
    a, b, c = (x / 1000.0 for x in ms)
    return a, b, c
