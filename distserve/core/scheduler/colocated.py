"""Both phases on one instance: the vLLM baseline (prefill first) and the
Sarathi-Serve baseline (chunked prefill under one token budget)."""

from __future__ import annotations

import dataclasses

from distserve.core.config import SchedulerConfig
from distserve.core.plan import ScheduledChunk, StepPlan
from distserve.core.request import Request, RequestStatus
from distserve.core.scheduler.base import Scheduler

Copies = list[tuple[int, int]]


class ColocatedScheduler(Scheduler):
    """Prefill-first (default): a step runs either a batch of prompts or one decode token
    for every running request, prompts first whenever one fits, as vLLM does.

    With `config.chunked_prefill`: every step spends one token budget, decode tokens
    first (one per running request), then prompt chunks of the oldest prompts, so a long
    prompt never stalls the decodes for more than one step's budget.

    `reconfigure` turns chunked prefill on or off between steps (adaptive re-planning).
    """

    _partial_prompts = False
    """Chunking was turned off while prompts were partly computed: they finish first."""

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Turn chunked prefill on or off (with its token budget) before the next step;
        no other field may change. Requests keep their blocks and computed tokens, so
        nothing is dropped or computed twice: a step in flight is applied as planned, and
        a prompt that chunks left partly computed runs its rest first, whole, once
        chunking is off."""
        changed = {
            f.name
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(self.config, f.name)
        }
        if changed - {"chunked_prefill", "max_num_batched_tokens"}:
            raise ValueError(f"only chunked prefill and its budget may change, not {changed}")
        self.config = config
        self._partial_prompts = not config.chunked_prefill and any(
            r.status == RequestStatus.PREFILLING for r in self.running
        )

    def schedule(self, now: float) -> StepPlan:
        swap_out: Copies = []
        swap_in: Copies = []
        if self.config.chunked_prefill:
            chunks = self._schedule_chunked(now, swap_out, swap_in)
        else:
            chunks = self._finish_partial_prompts(swap_out) if self._partial_prompts else []
            if not chunks and not swap_out:
                chunks = (
                    []
                    if self.swapped
                    else self._admit_prompts(now, self.config.max_num_batched_tokens)
                )
            if not chunks:
                chunks = self._schedule_decodes(now, swap_out)
                if not swap_out:
                    chunks += [self._chunk(r, 1) for r in self._swap_in(swap_in)]
        return StepPlan(
            self._next_step_id(), tuple(chunks), tuple(swap_out), tuple(swap_in),
            loads=self._take_loads(),
        )  # fmt: skip

    def _admit_prompts(self, now: float, budget: int) -> list[ScheduledChunk]:
        """New (or recomputing) requests, FCFS, while tokens, seats and blocks allow, each
        from the end of its cached prefix. Without chunking each runs whole; with it the
        last one may get a partial chunk."""
        chunks: list[ScheduledChunk] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.blocks.lookup(req)
            remote = self._remote_blocks(req, len(cached))
            # a waiting request computed nothing
            start = (len(cached) + remote) * self.blocks.block_size
            n = req.num_tokens - start
            if n > budget:
                if not self.config.chunked_prefill:
                    break
                n = budget
            if not self.blocks.can_allocate(req.request_id, start + n, admit=True, cached=cached):
                break
            self.waiting.popleft()
            self._start(req, start + n, cached, RequestStatus.PREFILLING, now, remote)
            chunks.append(self._chunk(req, n))
            budget -= n
        return chunks

    def _finish_partial_prompts(self, swap_out: Copies) -> list[ScheduledChunk]:
        """The rest of each prompt left partly computed when chunking was turned off,
        oldest first, while the token budget allows (one always fits: a prompt is at most
        max_model_len); none left: back to the plain policy."""
        chunks: list[ScheduledChunk] = []
        budget = self.config.max_num_batched_tokens
        partial = [r for r in self.running if r.status == RequestStatus.PREFILLING]
        if not partial:
            self._partial_prompts = False
        for req in partial:
            n = req.num_uncomputed_tokens
            if n > budget:
                break
            if req in self.running and self._grow_or_preempt(req, req.num_tokens, swap_out):
                chunks.append(self._chunk(req, n))
                budget -= n
        running = {r.request_id for r in self.running}  # a victim of a later growth
        return [c for c in chunks if c.request_id in running]

    def _schedule_chunked(
        self, now: float, swap_out: Copies, swap_in: Copies
    ) -> list[ScheduledChunk]:
        chunks = self._schedule_decodes(now, swap_out)
        budget = self.config.max_num_batched_tokens - len(chunks)
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.PREFILLING or req not in self.running:
                continue
            n = min(req.num_uncomputed_tokens, budget)
            if self._grow_or_preempt(req, req.num_computed_tokens + n, swap_out):
                chunks.append(self._chunk(req, n))
                budget -= n
        if not swap_out:
            if self.swapped:
                chunks += [self._chunk(r, 1) for r in self._swap_in(swap_in)]
            else:
                chunks += self._admit_prompts(now, budget)
        # A request preempted after its chunk was built must not run.
        running = {r.request_id for r in self.running}
        return [c for c in chunks if c.request_id in running]

    def _on_sampled(self, req: Request, now: float) -> None:
        if req.status == RequestStatus.PREFILLING:
            req.mark("prefill_end", now)
            req.status = RequestStatus.DECODING
