"""Steady decode spans: how many coming steps of a scheduler are certain to be the same
pure decode step of the same batch, and applying such a span at once.

The simulator uses this to cross thousands of decode steps quickly without a second
copy of the policy: the scheduler's own rules decide how long its decision holds.
A span ends with the first step in which a request finishes (`end_span` finishes it, as
that step's update would), and before any step in which anything else could differ:
blocks running short (a preemption), or a queue that could admit someone. Events from
outside (arrivals, migrations) are the caller's to bound by time.
"""

from __future__ import annotations

from distserve.core.request import FinishReason, Request, RequestStatus
from distserve.core.scheduler.base import Scheduler
from distserve.core.scheduler.decode import DecodeScheduler


def steady_decode_steps(sched: Scheduler) -> int:
    """Number k >= 0 of next steps that are each 'one token for every running request'
    with no preemption or admission among them and no finish before the last (the step
    after them may differ)."""
    if sched.waiting or sched.swapped:
        return 0
    if isinstance(sched, DecodeScheduler) and sched.pending:
        return 0
    return span_limit(sched, sched.running)


def span_limit(sched: Scheduler, running: list[Request]) -> int:
    """The longest span a batch allows: all decoding, nobody finishing before its last
    step, block growth covered by free blocks."""
    if not running:
        return 0
    max_len = sched.config.max_model_len
    decoding = RequestStatus.DECODING
    # A request with f tokens left finishes in its f-th step: the span's last.
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
    k = left
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


def begin_span(
    sched: Scheduler, batch: list[Request], steps: int, now: float, lazy: bool = False
) -> list[tuple[int, int, int]]:
    """Start a span of `steps` steady decode steps of `batch` (the running requests).

    Eager (the default): take every block the span will need now. Any event during the
    span comes after its last step has started, by which time the step-by-step engine
    holds these blocks too, so whoever looks at this scheduler meanwhile (routing) sees
    the same state.

    `lazy` (for `steps` just given by `steady_decode_steps`, not checked again): take
    none yet, and return when each is due (`span_growth`). The caller takes them with
    `take_span_blocks` as the steps start (at the latest before anyone looks at the
    blocks, and before `end_span`): a span that an event cuts short (the simulator's,
    when work arrives for its instance) then leaves the block tables, free list and
    evictions of the steps that ran, as if they had run one by one."""
    if not lazy and steps > span_limit(sched, batch):  # lazy: `steps` is its caller's
        raise ValueError(f"{steps} steps are not a steady span of this batch")
    for req in batch:
        if "decode_start" not in req.timestamps:  # req.mark's test, inlined: the hot path
            req.mark("decode_start", now)
    if not lazy:
        for req in batch:
            sched.blocks.allocate(req.request_id, req.num_tokens + steps - 1)
        return []
    due: list[tuple[int, int, int]] = []
    for i, req in enumerate(batch):
        span_growth(sched, req, i, 0, steps, due)
    due.sort()
    return due


def span_growth(
    sched: Scheduler,
    req: Request,
    i: int,
    joined: int,
    steps: int,
    due: list[tuple[int, int, int]],
) -> None:
    """Append to `due` when request `i` of a span needs each new block, as (step, i,
    tokens its table must cover then), for a request that joined the span after its
    step `joined` (0: from the start), up to step `steps` (1-based, the span's count)."""
    bs = sched.blocks.block_size
    num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
    # its r-th step computes position num_tokens + r - 2: its table covers num_tokens + r - 1
    first = sched.blocks.num_blocks_of(req.request_id) * bs - num_tokens + 2
    if first <= steps - joined:  # most requests of a short span need no block
        for r in range(first, steps - joined + 1, bs):
            step = max(r, 1)
            due.append((joined + step, i, num_tokens + step - 1))


def take_span_blocks(
    sched: Scheduler,
    batch: list[Request],
    due: list[tuple[int, int, int]],
    taken: int,
    upto: int,
) -> int:
    """Take a lazy span's blocks (`begin_span`'s `due`, of which the first `taken` are
    taken) that its steps up to `upto` need; returns how many are taken now."""
    blocks = sched.blocks
    while taken < len(due) and due[taken][0] <= upto:
        _, i, tokens = due[taken]
        blocks.allocate(batch[i].request_id, tokens)
        taken += 1
    return taken


def end_span(
    sched: Scheduler,
    batch: list[Request],
    steps: int,
    token: int,
    now: float,
    joined: list[int] | None = None,
) -> list[Request]:
    """Finish a span begun with `begin_span`: each request gains `steps` tokens (all
    `token`; `steps - joined[i]` for one that joined after step `joined[i]`) and the
    blocks they filled join the prefix cache; those whose last token that was (the
    span's last step, `steady_decode_steps`) finish at `now`, and are returned. This
    leaves the state `steps` schedule/update rounds would. Requests that queued meanwhile
    wait for its end, as they would have waited for its last step."""
    max_len = sched.config.max_model_len
    blocks = sched.blocks
    bs = blocks.block_size
    # blocks.cache_blocks' own test, inlined (as in Scheduler.update): most spans fill no
    # block of most requests
    registered = blocks.cache._num_registered if blocks.cache is not None else None
    tokens = [token] * steps
    ending = []
    for i, req in enumerate(batch):
        gained = steps - joined[i] if joined is not None else steps
        if gained <= 0:
            continue  # joined for steps the span no longer has
        outputs = req.output_token_ids
        computed = req.num_computed_tokens = len(req.prompt_token_ids) + len(outputs) + gained - 1
        outputs.extend(tokens if gained == steps else tokens[:gained])
        if req.sampling_params.logprobs is not None:
            req.output_logprobs.extend([None] * gained)
        if registered is not None and computed // bs > registered.get(req.request_id, 0):
            blocks.cache_blocks(req, computed)
        if len(outputs) >= req.sampling_params.max_tokens or computed + 1 >= max_len:
            ending.append(req)
    finished = []
    for req in ending:  # in the order of the step's chunks, as update finishes them
        reason = req.check_stop()
        if reason is None and req.num_tokens >= max_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            sched.finish_request(req.request_id, reason, now)
            finished.append(req)
    return finished
