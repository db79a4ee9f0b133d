"""Steady decode spans: how many coming steps of a scheduler are certain to be the same
pure decode step of the same batch, and applying such a span at once.

The simulator uses this to cross thousands of decode steps quickly without a second
copy of the policy: the scheduler's own rules decide how long its decision holds.
A span ends before the first step in which anything could differ: a request finishing,
blocks running short (a preemption), or a queue that could admit someone. Events from
outside (arrivals, migrations) are the caller's to bound by time.
"""

from __future__ import annotations

from distserve.core.request import Request, RequestStatus
from distserve.core.scheduler.base import Scheduler
from distserve.core.scheduler.decode import DecodeScheduler


def steady_decode_steps(sched: Scheduler) -> int:
    """Number k >= 0 of next steps that are each 'one token for every running request'
    with no finish, preemption or admission among them (the step after them may differ)."""
    if sched.waiting or sched.swapped:
        return 0
    if isinstance(sched, DecodeScheduler) and sched.pending:
        return 0
    return _span_limit(sched, sched.running)


def _span_limit(sched: Scheduler, running: list[Request]) -> int:
    """The longest span a batch allows: all decoding, nobody finishing before its last
    step, block growth covered by free blocks."""
    if not running:
        return 0
    max_len = sched.config.max_model_len
    decoding = RequestStatus.DECODING
    # A request with f tokens left finishes in its f-th step: stop one step before.
    left = max_len + 1  # above any request's (one loop, token counts inlined: the hot path)
    for r in running:
        num_outputs = len(r.output_token_ids)
        num_tokens = len(r.prompt_token_ids) + num_outputs
        if r.status != decoding or num_tokens - r.num_computed_tokens != 1:
            return 0
        f = r.sampling_params.max_tokens - num_outputs
        if f > max_len - num_tokens + 1:
            f = max_len - num_tokens + 1
        if f < left:
            left = f
    k = left - 1
    if k <= 0:
        return 0
    blocks, bs = sched.blocks, sched.blocks.block_size
    free = blocks.num_free_blocks
    if free >= len(running) * (k // bs + 1):
        return k  # enough blocks for every request to grow k tokens, whatever its fill
    # Step j (1-based) needs a table covering num_tokens + j - 1 tokens: request i can take
    # `room` steps on the blocks it has, then needs a new block every bs steps.
    rooms = [blocks.num_blocks_of(r.request_id) * bs - r.num_tokens + 1 for r in running]

    def fits(steps: int) -> bool:
        return sum((steps - room + bs - 1) // bs for room in rooms if steps > room) <= free

    if not fits(1):
        return 0
    lo, hi = 1, k
    while lo < hi:  # the largest span whose block growth fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def begin_span(sched: Scheduler, batch: list[Request], steps: int, now: float) -> None:
    """Start a span of `steps` steady decode steps of `batch` (the running requests): take
    every block the span will need now. Any event during the span comes after its last
    step has started, by which time the step-by-step engine holds these blocks too, so
    whoever looks at this scheduler meanwhile (routing) sees the same state."""
    if steps > _span_limit(sched, batch):
        raise ValueError(f"{steps} steps are not a steady span of this batch")
    for req in batch:
        sched.blocks.allocate(req.request_id, req.num_tokens + steps - 1)
        req.mark("decode_start", now)


def end_span(sched: Scheduler, batch: list[Request], steps: int, token: int) -> None:
    """Finish a span begun with `begin_span`: each request gains `steps` tokens (all
    `token`) and the blocks they filled join the prefix cache, leaving the state `steps`
    schedule/update rounds would. Requests that joined or queued meanwhile wait for its
    end, as they would have waited for its last step."""
    for req in batch:
        req.num_computed_tokens = req.num_tokens + steps - 1
        req.append_tokens(token, steps)
        sched.blocks.cache_blocks(req, req.num_computed_tokens)
