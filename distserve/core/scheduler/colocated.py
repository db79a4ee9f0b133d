"""Both phases on one instance: the vLLM baseline (prefill first) and the
Sarathi-Serve baseline (chunked prefill under one token budget)."""

from __future__ import annotations

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
    """

    def schedule(self, now: float) -> StepPlan:
        swap_out: Copies = []
        swap_in: Copies = []
        if self.config.chunked_prefill:
            chunks = self._schedule_chunked(now, swap_out, swap_in)
        else:
            chunks = (
                [] if self.swapped else self._admit_prompts(now, self.config.max_num_batched_tokens)
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
