"""Per-request results and the results file: {"config", "summary", "requests"}."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """What the client saw of one request. Times are seconds; `arrival` and `sent` are
    relative to the start of the run, the latencies to the moment it was sent."""

    index: int
    prompt_len: int
    output_len: int
    """Tokens asked for (max_tokens, with ignore_eos)."""
    arrival: float
    sent: float = 0.0
    ttft: float | None = None
    tpot: float | None = None
    """(t_last - t_first) / (n - 1); 0 for a one-token answer."""
    e2e: float | None = None
    num_tokens: int = 0
    """Completion tokens the server reported."""
    error: str | None = None
    server: dict[str, float] = field(default_factory=dict)
    """The server's milestones for this request (seconds after its arrival there)."""
    cached_tokens: int | None = None
    """Prompt tokens the server's prefix cache supplied (its usage's
    prompt_tokens_details.cached_tokens); None where it did not say."""
    session: int | None = None
    """The multi-turn session of a turn (None: an independent request)."""
    turn: int = 0
    """Its place in the session: 0 for the first turn."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None


def write_results(
    path: str, config: dict[str, Any], summary: dict[str, Any], requests: list[RequestResult]
) -> None:
    """Write a results file (its directory made if missing)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {"config": config, "summary": summary, "requests": [asdict(r) for r in requests]},
            f,
            indent=1,
        )


def read_results(path: str) -> tuple[dict[str, Any], dict[str, Any], list[RequestResult]]:
    """(config, summary, requests) of a results file."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return d["config"], d["summary"], [RequestResult(**r) for r in d["requests"]]
