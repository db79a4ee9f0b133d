"""How fast prompts leave the prefill queues, so that a client refused for overload is told
when to come back (the 429's Retry-After) from the queue it met rather than a constant."""

from __future__ import annotations

import math
from collections import deque

UNKNOWN_RETRY = 10
"""Seconds to tell a client while no prompt has left the queues within the window."""
MAX_RETRY = 600


class DrainRate:
    """First tokens per second over a sliding window of `window` seconds (a prompt's first
    token is when it leaves the prefill queue)."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._times: deque[float] = deque()

    def record(self, now: float) -> None:
        self._times.append(now)
        self._forget(now)

    def retry_after(self, excess: int, now: float) -> int:
        """Whole seconds until `excess` more prompts have left the queues at the recent
        rate, at least 1 and at most MAX_RETRY."""
        self._forget(now)
        if not self._times:
            return UNKNOWN_RETRY
        span = max(now - self._times[0], 1.0)  # one burst of first tokens is no rate
        rate = len(self._times) / span
        return int(min(MAX_RETRY, max(1, math.ceil(excess / rate))))

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
