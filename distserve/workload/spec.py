"""The workload format shared by the load client and the simulator."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

DATASETS = ("chatbot", "code", "summarization", "random", "fixed", "trace", "conversations")
"""The workloads a `WorkloadSpec` names (here, beside the format, so that the CLI can list
them without loading the builders' numpy)."""
SESSION_DATASETS = ("conversations",)
"""Workloads of multi-turn sessions: a later turn is sent when the one before has been
answered (closed loop), so only a live client replays them as they are."""


@dataclass(frozen=True)
class WorkloadRequest:
    """One request to send: its prompt as token ids (exact lengths, no re-tokenization
    on the way) and how many tokens to force out of the model."""

    index: int
    arrival: float
    """Seconds after the start of the run."""
    prompt_token_ids: tuple[int, ...]
    output_len: int
    session: int | None = None
    """The multi-turn session this request is a turn of (None: an independent request)."""
    turn: int = 0
    """Its place in the session (0: the first turn, sent at `arrival`)."""
    think_time: float = 0.0
    """A later turn: seconds from the previous turn's answer to this turn's send. Its
    `arrival` is then nominal: the time it would arrive if every answer took no time."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order, and how they were made (written beside every result)."""

    requests: tuple[WorkloadRequest, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrivals = [r.arrival for r in self.requests]
        if arrivals != sorted(arrivals):
            raise ValueError("workload requests must be in arrival order")
        for r in self.requests:
            if r.prompt_len < 1 or r.output_len < 1:
                raise ValueError(f"request {r.index}: prompt and output need >= 1 token")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def lengths(self) -> list[tuple[int, int]]:
        return [(r.prompt_len, r.output_len) for r in self.requests]

    def summary(self) -> dict[str, float]:
        """Mean and median prompt and output lengths."""
        if not self.requests:
            return {}
        p = sorted(r.prompt_len for r in self.requests)
        o = sorted(r.output_len for r in self.requests)
        n = len(p)
        return {
            "num_requests": n,
            "prompt_mean": sum(p) / n,
            "prompt_median": p[n // 2],
            "output_mean": sum(o) / n,
            "output_median": o[n // 2],
            "duration_s": self.duration,
        }

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "requests": [asdict(r) for r in self.requests]})

    @classmethod
    def from_json(cls, text: str) -> Workload:
        d = json.loads(text)
        reqs = tuple(
            WorkloadRequest(
                r["index"],
                r["arrival"],
                tuple(r["prompt_token_ids"]),
                r["output_len"],
                r.get("session"),
                r.get("turn", 0),
                r.get("think_time", 0.0),
            )
            for r in d["requests"]
        )
        return cls(reqs, d.get("meta", {}))
