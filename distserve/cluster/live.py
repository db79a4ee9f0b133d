"""The live view: a sliding window over what arrives (rate, prompt and output lengths) and
what it attains (TTFT, TPOT, both) against the server's targets. /metrics reads it, and
adaptive re-planning (cluster/adaptive.py) replays its requests in the simulator: those
that arrived in it, finished or not, and those still queued or running."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distserve.sim.replan import window_workload
from distserve.workload.spec import Workload

if TYPE_CHECKING:
    from distserve.core import Request


@dataclass(frozen=True)
class Finished:
    """One request that ended in the window."""

    arrival: float
    prompt_token_ids: tuple[int, ...]
    output_len: int
    ttft: float | None
    tpot: float | None
    """None with one output token (no gap between tokens)."""


class LiveWindow:
    """Requests that arrived / finished in the last `seconds` (monotonic clock)."""

    def __init__(
        self, seconds: float = 120.0, ttft_slo: float | None = None, tpot_slo: float | None = None
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"the live window must be > 0 s, got {seconds}")
        self.seconds, self.ttft_slo, self.tpot_slo = seconds, ttft_slo, tpot_slo
        self._arrivals: collections.deque[float] = collections.deque()
        self._finished: collections.deque[Finished] = collections.deque()
        self._pending: dict[str, Request] = {}
        """Requests that arrived and have not ended (queued or running), by id."""

    def _trim(self, now: float) -> None:
        while self._arrivals and self._arrivals[0] < now - self.seconds:
            self._arrivals.popleft()
        while self._finished and self._finished[0].arrival < now - self.seconds:
            self._finished.popleft()

    def on_arrival(self, now: float, request: Request | None = None) -> None:
        """A request arrived; with `request`, it is replayed until it ends (`forget`)."""
        self._arrivals.append(now)
        if request is not None:
            self._pending[request.request_id] = request
        self._trim(now)

    def on_finished(self, done: Finished, now: float) -> None:
        self._finished.append(done)
        self._trim(now)

    def forget(self, request_id: str) -> None:
        """A request ended (finished, aborted or failed): no longer pending."""
        self._pending.pop(request_id, None)

    def arrival_rate(self, now: float) -> float:
        """Requests per second over the window (or over the time since the first one)."""
        self._trim(now)
        if not self._arrivals:
            return 0.0
        span = min(self.seconds, max(now - self._arrivals[0], 1.0))
        return len(self._arrivals) / span

    def finished(self, now: float) -> list[Finished]:
        self._trim(now)
        return list(self._finished)

    def attainment(self, now: float) -> dict[str, float]:
        """Share of the window's finished requests within each target (and both), as
        the benchmark counts them: a one-token request meets TPOT."""
        done = self.finished(now)
        if not done or self.ttft_slo is None or self.tpot_slo is None:
            return {}
        ttft = [d.ttft is not None and d.ttft <= self.ttft_slo for d in done]
        tpot = [d.tpot is None or d.tpot <= self.tpot_slo for d in done]
        both = [a and b for a, b in zip(ttft, tpot, strict=True)]
        n = len(done)
        return {"ttft": sum(ttft) / n, "tpot": sum(tpot) / n, "both": sum(both) / n}

    def lengths(self, now: float) -> dict[str, float]:
        done = self.finished(now)
        if not done:
            return {}
        prompts = [len(d.prompt_token_ids) for d in done]
        outputs = [d.output_len for d in done]
        return {
            "prompt_mean": statistics.fmean(prompts),
            "prompt_p90": _p90(prompts),
            "output_mean": statistics.fmean(outputs),
            "output_p90": _p90(outputs),
        }

    def workload(self, now: float, limit: int | None = None) -> Workload:
        """The window's requests as a workload, arrivals from its start: the finished ones,
        and those queued or running (their output lengths estimated, sim/replan.py's
        `window_workload`; those that arrived before the window as arriving at its start);
        with `limit`, only the latest that many (a cheaper re-plan at a high rate)."""
        rows = [(d.arrival, d.prompt_token_ids, d.output_len) for d in self.finished(now)]
        pending = [
            (r.arrival_time, r.prompt_token_ids, r.num_output_tokens, r.sampling_params.max_tokens)
            for r in list(self._pending.values())
        ]
        label = {"dataset": "live window", "seconds": self.seconds}
        # the simulator's re-plans' too
        return window_workload(rows, label, limit, pending, now - self.seconds)


def _p90(xs: list[int]) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(0.9 * len(s)))])
