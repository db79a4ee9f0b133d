"""Cuttable decode spans: the simulator's steady decode steps (core/scheduler/
fast_forward.py) run as one event for as long as their batch is steady, not only until
the next event anywhere.

Where nothing but routing looks at an instance from outside (no re-planner, per-request
rule, KV store or contention: `Simulator._cuttable`), other instances' events leave a
span alone. Work for its own instance acts on it as on the step-by-step engine at its
next schedule, which comes when the step in flight ends:

- a prompt routed to it *cuts* it: the span ends with that step;
- a handoff is admitted when that step ends, and the span goes on (it is cut if the
  admission waits for blocks or leaves too few for the span's later steps);
- a request whose KV has arrived joins the batch from the next step, the step times then
  following a new clock.

A span's blocks are taken as its steps start and settled before routing reads its
instance, so free counts, evictions and prefix hits are those of the steps that ran.
tests/sim/test_simulator.py checks that the results equal a step-by-step run's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distserve.core import DecodeScheduler, Request
from distserve.core.scheduler.fast_forward import (
    begin_span,
    span_growth,
    span_limit,
    steady_decode_steps,
    take_span_blocks,
)

if TYPE_CHECKING:
    from distserve.sim.simulator import SimInstance, Simulator


@dataclass
class Span:
    """Steady decode steps of `batch` from `start`, run as one event unless work for
    their instance cuts them short or joins them (`joined`: the step after which each
    request joined)."""

    start: float
    batch: list[Request]
    steps: int
    segments: list[tuple[int, float, Callable[[int], float]]]
    """(first step, when it starts, seconds of its first m steps: LatencyModel.decode_clock)
    of the batch from the start, and of each batch after a join."""
    due: list[tuple[int, int, int]]
    """When each block is needed (fast_forward.span_growth), in step order."""
    taken: int = 0
    admit_at: float = -1.0
    """When its instance next admits handoffs during the span (-1: not due)."""
    joined: list[int] = field(default_factory=list)
    version: int = 0
    """Bumped whenever its end moves (the end event of another version is stale)."""

    def step_start(self, s: int) -> float:
        """When step s (1-based; s = steps + 1: when the last one ends) starts."""
        # the last batch begun by then (few: the joins of one span; the first begins at 1)
        first, start, clock = next(seg for seg in reversed(self.segments) if seg[0] <= s)
        return start + clock(s - first)

    def begun(self, t: float) -> int:
        """Steps begun before `t` (at least the first: it began when the span did, which
        was before anything at `t` happens)."""
        lo, hi = 1, self.steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step_start(mid) < t:
                lo = mid
            else:
                hi = mid - 1
        return lo


def begin(sim: Simulator, inst: SimInstance, t: float) -> bool:
    """Start a span on `inst` if its batch is steady for 2 steps or more."""
    k = steady_decode_steps(inst.scheduler)
    if k < 2:
        return False
    batch = list(inst.scheduler.running)
    clock = inst.latency.decode_clock([r.num_tokens - 1 for r in batch])
    due = begin_span(inst.scheduler, batch, k, t, lazy=True)
    span = inst.span = Span(t, batch, k, [(1, t, clock)], due, joined=[0] * len(batch))
    inst.busy = inst.decoding = True
    _end_at(sim, inst, span)
    return True


def _end_at(sim: Simulator, inst: SimInstance, span: Span) -> None:
    """(Re)schedule the end of `inst`'s span: when its last step ends."""
    span.version += 1
    end = functools.partial(_done, sim, inst=inst, span=span, version=span.version)
    sim._at(span.step_start(span.steps + 1), "span", end)


def _done(sim: Simulator, t: float, inst: SimInstance, span: Span, version: int) -> None:
    if inst.span is not span or span.version != version:
        return  # cut short or joined: another event ends it
    steps = span.steps
    span.taken = take_span_blocks(inst.scheduler, span.batch, span.due, span.taken, steps)
    inst.steps, inst.busy_seconds = inst.steps + steps, inst.busy_seconds + t - span.start
    inst.span, inst.busy = None, False
    sim._spanned(inst, span.batch, steps, t, span.joined)


def settle(inst: SimInstance, t: float) -> None:
    """Before anyone looks at `inst` at `t`: take the blocks of its span's steps begun by
    then (as a step-by-step engine would hold them)."""
    span = inst.span
    if span is None or span.taken == len(span.due):
        return
    if span.step_start(span.due[span.taken][0]) >= t:
        return  # the next block is for a step not begun yet (the common case)
    span.taken = take_span_blocks(inst.scheduler, span.batch, span.due, span.taken, span.begun(t))


def cut(sim: Simulator, inst: SimInstance, t: float) -> None:
    """Work for `inst` came at `t`: its span ends with the step in flight, after which it
    schedules again (as after any step)."""
    span = inst.span
    if span is None:
        return
    settle(inst, t)
    m = span.begun(t)
    if m < span.steps:
        span.steps = m
        _end_at(sim, inst, span)


def admit_after_step(sim: Simulator, inst: SimInstance, t: float) -> None:
    """A handoff came to a decode instance at `t`: it is admitted when the step in flight
    ends, as the step-by-step engine would at its next wake. That does not change the
    batch (the request joins it only when its KV has arrived), so the span goes on,
    unless the admission waits for blocks or leaves too few for the span's later steps:
    it is cut then."""
    span = inst.span
    if span is None:
        return
    m = span.begun(t)
    end = span.step_start(m + 1)
    if m < span.steps and span.admit_at != end:
        span.admit_at = end
        sim._at(end, "admit", functools.partial(_admit_in_span, sim, inst=inst, span=span))


def _admit_in_span(sim: Simulator, t: float, inst: SimInstance, span: Span) -> None:
    if inst.span is not span:
        return  # the span has ended: its instance's wake admitted
    sched = inst.scheduler
    assert isinstance(sched, DecodeScheduler)
    settle(inst, t)  # the steps begun: the next begins now, after the admission
    sim._admit(inst, sched, t)
    if sched.pending or len(span.due) - span.taken > sched.blocks.num_free_blocks:
        cut(sim, inst, t)


def join(sim: Simulator, inst: SimInstance, req: Request, t: float) -> bool:
    """`req`'s KV arrived at `t` on `inst`, inside a span: it joins the span's batch from
    the next step, as the step-by-step engine would take it at its next schedule; False
    (and nothing changed) where the span must end instead (its last step is in flight,
    or the request or the blocks do not allow a steady span)."""
    span = inst.span
    assert span is not None
    sched = inst.scheduler
    m = span.begun(t)
    if m >= span.steps:
        return False
    left = span_limit(sched, [req])
    if left < 1:
        return False
    steps = min(span.steps, m + left)
    due = [d for d in span.due[span.taken :] if d[0] <= steps]
    span_growth(sched, req, len(span.batch), m, steps, due)
    if len(due) > sched.blocks.num_free_blocks:
        return False  # a later step would preempt: the scheduler decides that
    due.sort()
    span.due, span.taken = due, 0
    span.batch.append(req)
    span.joined.append(m)
    begins = span.step_start(m + 1)
    contexts = [r.num_tokens - 1 + m - j for r, j in zip(span.batch, span.joined, strict=True)]
    clock = inst.latency.decode_clock(contexts)
    if span.segments[-1][0] == m + 1:
        span.segments[-1] = (m + 1, begins, clock)  # another join at the same step
    else:
        span.segments.append((m + 1, begins, clock))
    if "decode_start" not in req.timestamps:
        req.mark("decode_start", begins)
    span.steps = steps
    _end_at(sim, inst, span)
    return True
