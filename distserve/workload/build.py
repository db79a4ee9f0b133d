"""Build a workload from a spec: samples from a dataset, lengths capped for small
hardware, arrival times from a process, all from one seed."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from distserve.workload import datasets
from distserve.workload.arrivals import arrival_times
from distserve.workload.cache import cached_samples, tokenizer_fingerprint
from distserve.workload.conversations import build_sessions
from distserve.workload.spec import DATASETS, Workload, WorkloadRequest


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload; recorded in every result file."""

    dataset: str = field(default="chatbot", metadata={"help": "one of " + ", ".join(DATASETS)})
    num_requests: int = field(default=100, metadata={"help": "requests to send"})
    rate: float = field(
        default=1.0, metadata={"help": "mean arrivals per second (inf: all at once)"}
    )
    burstiness: float = field(
        default=1.0, metadata={"help": "coefficient of variation of gaps (1: Poisson)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of sampling and arrivals"})
    max_prompt_len: int | None = field(
        default=None, metadata={"help": "cut longer prompts to this many tokens"}
    )
    max_output_len: int | None = field(default=None, metadata={"help": "cap output lengths"})
    prompt_len: tuple[int, int] = field(
        default=(128, 512), metadata={"help": "random/fixed: prompt length range"}
    )
    output_len: tuple[int, int] = field(
        default=(32, 128), metadata={"help": "random/fixed: output length range"}
    )
    trace_path: str | None = field(
        default=None, metadata={"help": "trace: file with timestamp, prompt_len, output_len"}
    )
    max_turns: int = field(default=8, metadata={"help": "conversations: most turns of one session"})
    think_time: float = field(
        default=1.0,
        metadata={"help": "conversations: mean seconds from an answer to the next turn"},
    )

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        for name in ("max_prompt_len", "max_output_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.dataset == "trace" and not self.trace_path:
            raise ValueError("dataset 'trace' needs trace_path")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0 <= self.think_time < math.inf:
            raise ValueError(f"think_time must be a finite number >= 0, got {self.think_time}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = self.rate if math.isfinite(self.rate) else "inf"
        return d


def load_samples(
    spec: WorkloadSpec, tokenizer: datasets.TokenizerLike
) -> tuple[Sequence[datasets.Sample], list[float] | None, dict[str, Any]]:
    """The dataset's samples (cached on disk for the text datasets) and, for a trace,
    its arrival times."""
    fp = tokenizer_fingerprint(tokenizer)
    if spec.dataset == "chatbot":
        key = f"chatbot-s{spec.seed}-{fp}"
        samples, info = cached_samples(key, lambda: datasets.chatbot(tokenizer, spec.seed))
        return samples, None, info
    if spec.dataset == "code":
        samples, info = datasets.code(tokenizer, spec.seed)
        return samples, None, info
    if spec.dataset == "summarization":
        key = f"summarization-v2-s{spec.seed}-{fp}"  # v2: outputs cut to fit
        samples, info = cached_samples(key, lambda: datasets.summarization(tokenizer, spec.seed))
        return samples, None, info
    if spec.dataset == "trace":
        assert spec.trace_path is not None
        samples, times, info = datasets.trace(spec.trace_path, spec.seed)
        return samples, times, info
    lengths = (spec.prompt_len, spec.output_len)
    if spec.dataset == "fixed":
        lengths = ((spec.prompt_len[0],) * 2, (spec.output_len[0],) * 2)
    samples, info = datasets.random_lengths(spec.seed, spec.num_requests, *lengths)
    return samples, None, info


def build_workload(spec: WorkloadSpec, tokenizer: datasets.TokenizerLike) -> Workload:
    if spec.dataset == "conversations":  # sessions of turns, not independent samples
        return build_sessions(spec, tokenizer)  # type: ignore[arg-type]
    samples, trace_times, info = load_samples(spec, tokenizer)
    if not samples:
        raise ValueError(f"dataset {spec.dataset!r} produced no samples")
    rng = random.Random(spec.seed + 1)
    order: list[int] = []
    if trace_times is not None:
        order = list(range(min(spec.num_requests, len(samples))))
        times = trace_times[: len(order)]
    else:
        while len(order) < spec.num_requests:  # without replacement until the data runs out
            block = list(range(len(samples)))
            rng.shuffle(block)
            order.extend(block)
        order = order[: spec.num_requests]
        times = arrival_times(len(order), spec.rate, spec.burstiness, spec.seed + 2)
    requests = []
    for i, (k, t) in enumerate(zip(order, times, strict=True)):
        prompt, out = samples[k]
        if spec.max_prompt_len is not None:
            prompt = prompt[: spec.max_prompt_len]
        if spec.max_output_len is not None:
            out = min(out, spec.max_output_len)
        requests.append(WorkloadRequest(i, t, tuple(prompt), out))
    wl = Workload(tuple(requests), {"spec": spec.to_dict(), "dataset": info})
    wl.meta["lengths"] = wl.summary()
    return wl
