"""What every scheduler shares: request ownership, chunk building, stop checks,
preemption and the `update` half of the step contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from distserve.core.block_manager import BlockManager
from distserve.core.config import PreemptionMode, SchedulerConfig
from distserve.core.plan import ScheduledChunk, StepPlan, StepResult
from distserve.core.prefix_cache import TokenSequence
from distserve.core.request import FinishReason, Request, RequestStatus

_FINISHED = RequestStatus.FINISHED_STOPPED
"""The first finished status (`RequestStatus.finished`, without its two calls)."""

_FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


@dataclass
class StepOutput:
    """A request that got a new token (or finished) in a step."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler(ABC):
    """Owns the requests of one instance and its block manager.

    Ownership: a request added here is changed only by this scheduler until it finishes
    (its blocks freed here) or is handed off (prefill -> decode, blocks freed on confirm).
    `swap_blocks` is the host-side pool for swap preemption (None: no swapping).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        swap_blocks: BlockManager | None = None,
    ) -> None:
        if config.preemption_mode == PreemptionMode.SWAP and swap_blocks is None:
            raise ValueError("preemption_mode 'swap' needs host swap blocks (num_swap_blocks > 0)")
        self.config = config
        self.blocks = blocks
        self.swap_blocks = swap_blocks
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.num_preemptions = 0
        self.num_prompt_tokens_admitted = 0
        """Prompt tokens of the requests whose first prefill ran here (a counter)."""
        self.num_prompt_tokens_cached = 0
        """How many of those a prefix-cache hit supplied (a counter; the hit rate is
        this over `num_prompt_tokens_admitted`)."""
        self.remote_prefix: Callable[[TokenSequence, int, int], int] | None = None
        """How many more full blocks of a request, after the first `first` (its local
        prefix-cache hits) and up to `limit`, an outside store holds (core/kv_store.py);
        None: none. Blocks found there are counted computed and listed in the plan's
        `loads`."""
        self._loads: list[tuple[str, int, int]] = []
        self.detailed_plans = True
        """False: chunks carry counts only, no token ids or block tables (for a simulator,
        whose executor reads nothing else; the decisions are the same)."""
        self._step_id = 0

    # ---- the step contract --------------------------------------------------------
    @abstractmethod
    def schedule(self, now: float) -> StepPlan:
        """Choose this step's work. Never blocks, never sleeps; may return an empty plan."""

    def update(self, plan: StepPlan, result: StepResult, now: float) -> list[StepOutput]:
        """Apply an executed plan: advance computed tokens (and offer the blocks they
        filled to the prefix cache: their KV now exists), append sampled tokens, finish
        requests that hit a stop rule (their blocks are freed here). Requests aborted while
        the step ran are skipped."""
        outputs = []
        requests, blocks = self.requests, self.blocks
        # blocks.cache_blocks' own test, inlined (once per request per step): it names
        # blocks only once a request has more full ones than it has named
        registered = blocks.cache._num_registered if blocks.cache is not None else None
        bs = blocks.block_size
        sampled, logprobs = result.sampled, result.logprobs
        max_len = self.config.max_model_len
        for chunk in plan.chunks:
            rid = chunk.request_id
            req = requests.get(rid)
            if req is None or req.status >= _FINISHED:
                continue
            computed = req.num_computed_tokens = chunk.start + chunk.num_tokens  # context_len
            if registered is not None and computed // bs > registered.get(rid, 0):
                blocks.cache_blocks(req, computed)
            if chunk.sampling_params is None:
                continue
            token = sampled[rid]
            req.append_token(token, logprobs.get(rid))
            reason = req.check_stop()
            if reason is None and len(req.prompt_token_ids) + len(req.output_token_ids) >= max_len:
                reason = FinishReason.LENGTH
            self._on_sampled(req, now)
            if reason is not None:
                self.finish_request(rid, reason, now)
            outputs.append(StepOutput(req, [token], req.status >= _FINISHED))
        return outputs

    def _on_sampled(self, req: Request, now: float) -> None:
        """Role-specific bookkeeping after a request got a token (before stop handling)."""

    # ---- requests -----------------------------------------------------------------
    def check_request(self, req: Request) -> None:
        """Raise ValueError if the request can never run here."""
        max_len = self.config.max_model_len
        if req.num_tokens > max_len:
            raise ValueError(
                f"request {req.request_id}: {req.num_tokens} tokens exceed max_model_len {max_len}"
            )
        peak = min(req.num_prompt_tokens + req.sampling_params.max_tokens, max_len)
        # (Re)admission leaves the watermark free: a request needing more than the rest
        # could never start, or restart after a preemption, and would block the queue.
        usable = self.blocks.num_blocks - self.blocks.watermark_blocks
        if self.blocks.blocks_for(peak) > usable:
            raise ValueError(
                f"request {req.request_id}: needs {self.blocks.blocks_for(peak)} KV blocks, "
                f"the cache has {self.blocks.num_blocks} ({usable} above the watermark)"
            )
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")

    def add_request(self, req: Request) -> None:
        """Queue a new request for prefill (FCFS)."""
        self.check_request(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, request_id: str, reason: FinishReason, now: float) -> Request | None:
        """End a request: free its blocks and forget it. Idempotent; returns the request."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._drop_from_queues(req)
        self.blocks.free(request_id)
        if self.swap_blocks is not None:
            self.swap_blocks.free(request_id)
        req.status = _FINISHED_STATUS[reason]
        req.finish_reason = reason
        if req.status != RequestStatus.FINISHED_ABORTED and req.output_token_ids:
            req.mark("decode_end", now)
        req.mark("finished", now)
        return req

    def abort_request(self, request_id: str, now: float) -> Request | None:
        return self.finish_request(request_id, FinishReason.ABORT, now)

    def _drop_from_queues(self, req: Request) -> None:
        for queue in (self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
        if req in self.running:
            self.running.remove(req)

    # ---- counts -------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_queued_tokens(self) -> int:
        """Tokens waiting to be computed by requests not yet running."""
        return sum(r.num_uncomputed_tokens for r in self.waiting)

    @property
    def num_prompt_tokens_ahead(self) -> int:
        """Prompt tokens a new request would wait behind (the router's load): those queued
        and those of prompts being computed now (a step in flight, or chunks to come)."""
        # One pass, token counts inlined: the router asks every instance at every arrival.
        n = self.num_queued_tokens
        prefilling = RequestStatus.PREFILLING
        for r in self.running:
            if r.status == prefilling:
                n += len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
        return n

    # ---- helpers for subclasses ---------------------------------------------------
    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    def _chunk(self, req: Request, num_tokens: int) -> ScheduledChunk:
        """Build the chunk [computed, computed + num_tokens) of a request whose blocks
        already cover it. A chunk that reaches the end of the known tokens samples."""
        start = req.num_computed_tokens
        end = start + num_tokens
        samples = end == req.num_tokens
        detailed = self.detailed_plans
        if not detailed:
            return ScheduledChunk.counted(
                req.request_id,
                start,
                num_tokens,
                req.sampling_params if samples else None,
                len(req.output_token_ids),
            )
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=tuple(req.token_ids(start, end)) if detailed else (),
            start=start,
            block_table=tuple(self.blocks.block_table(req.request_id)) if detailed else (),
            sampling_params=req.sampling_params if samples else None,
            output_index=req.num_output_tokens,
            num_tokens=num_tokens,
        )

    def _grow_or_preempt(
        self, req: Request, num_tokens: int, swap_out: list[tuple[int, int]]
    ) -> bool:
        """Make `req`'s blocks cover `num_tokens`, preempting the newest running requests
        when blocks run out. Returns False if `req` itself had to be preempted."""
        if not self.blocks.blocks_needed(req.request_id, num_tokens):
            return True  # covered already (most decode steps): nothing to allocate
        while not self.blocks.can_allocate(req.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, swap_out)
            if victim is req:
                return False
        self.blocks.allocate(req.request_id, num_tokens)
        return True

    def _preempt(self, req: Request, swap_out: list[tuple[int, int]]) -> None:
        """Take a running request's blocks away: swap them to host memory if configured
        and room allows (decoding requests only), else drop them (its KV will be recomputed)."""
        self.running.remove(req)
        self.num_preemptions += 1
        req.num_preemptions += 1
        mode = self.config.preemption_mode
        n = self.blocks.num_blocks_of(req.request_id)
        swappable = (
            mode == PreemptionMode.SWAP
            and req.status == RequestStatus.DECODING
            and self.swap_blocks is not None
            and self.swap_blocks.can_allocate(req.request_id, n * self.blocks.block_size)
        )
        if swappable:
            assert self.swap_blocks is not None
            host = self.swap_blocks.allocate(req.request_id, n * self.blocks.block_size)
            swap_out.extend(zip(self.blocks.block_table(req.request_id), host, strict=True))
            self.blocks.free(req.request_id)
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
            return
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _num_active(self) -> int:
        """Requests holding a seat (of max_num_seqs)."""
        return len(self.running)

    def _admit_whole(self, now: float, status: RequestStatus) -> list[ScheduledChunk]:
        """Waiting requests, FCFS and without skipping, each computed in one chunk (its
        prompt, or prompt + outputs after a preemption, after what the prefix cache
        holds), while the token budget, seats and blocks above the watermark allow. They
        run with `status`."""
        chunks: list[ScheduledChunk] = []
        budget = self.config.max_num_batched_tokens
        while self.waiting and self._num_active() < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.blocks.lookup(req)
            remote = self._remote_blocks(req, len(cached))
            n = req.num_uncomputed_tokens - (len(cached) + remote) * self.blocks.block_size
            if n > budget or not self.blocks.can_allocate(
                req.request_id, req.num_tokens, admit=True, cached=cached
            ):
                break
            self.waiting.popleft()
            self._start(req, req.num_tokens, cached, status, now, remote)
            chunks.append(self._chunk(req, n))
            budget -= n
        return chunks

    def _remote_blocks(self, req: Request, first: int) -> int:
        if self.remote_prefix is None or req.num_computed_tokens:
            return 0
        return self.remote_prefix(req, first, (req.num_tokens - 1) // self.blocks.block_size)

    def _take_loads(self) -> tuple[tuple[str, int, int], ...]:
        loads, self._loads = tuple(self._loads), []
        return loads

    def _start(
        self,
        req: Request,
        num_tokens: int,
        cached: list[int],
        status: RequestStatus,
        now: float,
        remote: int = 0,
    ) -> None:
        """Admit the head of the waiting queue (popped by the caller), which holds no
        blocks: its table starts with the `cached` prefix blocks (from `lookup`, just
        now), then `remote` blocks an outside store fills (`remote_prefix`), and covers
        `num_tokens`; its computation starts after both."""
        self.blocks.allocate(req.request_id, num_tokens, cached)
        if remote:
            self._loads.append((req.request_id, len(cached), remote))
        hit = (len(cached) + remote) * self.blocks.block_size
        req.num_computed_tokens = hit
        if "prefill_start" not in req.timestamps:  # its first prefill: what usage reports
            req.num_cached_tokens = min(hit, req.num_prompt_tokens)
            self.num_prompt_tokens_admitted += req.num_prompt_tokens
            self.num_prompt_tokens_cached += req.num_cached_tokens
        req.status = status
        req.mark("prefill_start", now)
        self.running.append(req)

    def _swap_in(self, swap_in: list[tuple[int, int]]) -> list[Request]:
        """Bring swapped requests back, oldest first, while blocks and seats allow, with
        room for their next token; returns them (the copies run before the forward pass,
        so they decode in this very step)."""
        back: list[Request] = []
        while self.swapped and self._num_active() < self.config.max_num_seqs:
            req = self.swapped[0]
            if not self.blocks.can_allocate(req.request_id, req.num_tokens):
                break
            self.swapped.popleft()
            assert self.swap_blocks is not None
            host = self.swap_blocks.block_table(req.request_id)
            self.blocks.allocate(req.request_id, req.num_tokens)
            # The device table may be one block longer: room for the next token.
            swap_in.extend(zip(host, self.blocks.block_table(req.request_id), strict=False))
            self.swap_blocks.free(req.request_id)
            req.status = RequestStatus.DECODING
            self.running.append(req)
            back.append(req)
        return back

    def _schedule_decodes(
        self, now: float, swap_out: list[tuple[int, int]]
    ) -> list[ScheduledChunk]:
        """One token for every decoding request (continuous batching), preempting the
        newest when blocks run out."""
        chunks: list[Request] = []
        preemptions = self.num_preemptions
        decoding, bs = RequestStatus.DECODING, self.blocks.block_size
        tables = self.blocks._tables  # blocks.blocks_needed, inlined: per request per step
        # Victims are taken from the back, so a request already chosen is never preempted.
        for req in list(self.running):
            if req.status != decoding:
                continue
            if self.num_preemptions != preemptions and req not in self.running:
                continue  # preempted in this loop (only then can it have left `running`)
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            table = tables.get(req.request_id)
            covered = table is not None and -(-num_tokens // bs) <= len(table)
            if not covered and not self._grow_or_preempt(req, num_tokens, swap_out):
                continue
            chunks.append(req)
        for req in chunks:
            if "decode_start" not in req.timestamps:
                req.mark("decode_start", now)
        if self.detailed_plans:
            return [self._chunk(r, r.num_uncomputed_tokens) for r in chunks]
        counted = ScheduledChunk.counted  # _chunk's, inlined: one per request per step
        out = []
        for r in chunks:
            start, num_outputs = r.num_computed_tokens, len(r.output_token_ids)
            num_tokens = len(r.prompt_token_ids) + num_outputs - start  # to its end: samples
            out.append(counted(r.request_id, start, num_tokens, r.sampling_params, num_outputs))
        return out
