"""The step trace (`serve --trace-steps`) appends: a file kept across server restarts
keeps every lifetime's steps, in time order."""

from __future__ import annotations

import json
import time

from distserve.core import StepPlan
from distserve.core.plan import StepResult
from distserve.runtime.step_trace import StepTrace


def _lifetime(path: str, steps: int) -> None:
    trace = StepTrace(path)
    for i in range(steps):
        start = time.perf_counter()
        trace.record("colocated-0", "colocated", start, StepPlan(i), StepResult(elapsed=0.001))
    trace.close()


def test_a_reopened_trace_keeps_earlier_steps_in_time_order(tmp_path) -> None:
    path = str(tmp_path / "steps.jsonl")
    before = time.time()
    _lifetime(path, 3)
    time.sleep(0.01)
    _lifetime(path, 2)
    with open(path) as f:
        steps = [json.loads(line) for line in f]
    assert len(steps) == 5
    ts = [s["t"] for s in steps]
    assert ts == sorted(ts) and ts[3] > ts[2]  # the second lifetime starts after the first
    assert before - 1 < ts[0] < time.time() + 1  # Unix time, not time since opening
