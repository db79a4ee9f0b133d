"""Step plans over made-up requests, for timing the runner (the profiler, the kernel
choice at worker start): random prompt tokens, real block ids from a private block table
(contiguous allocation; timing does not depend on where blocks are)."""

from __future__ import annotations

import random

from distserve.core import BlockManager, SamplingParams, ScheduledChunk, StepPlan

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


class SyntheticPlans:
    def __init__(self, num_blocks: int, block_size: int, vocab: int, seed: int = 0) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.rng = random.Random(seed)
        self.vocab = vocab
        self._ids = 0

    def _chunk(self, start: int, n: int) -> ScheduledChunk:
        self._ids += 1
        rid = str(self._ids)
        table = self.blocks.allocate(rid, start + n)
        tokens = tuple(self.rng.randrange(100, min(self.vocab, 30000)) for _ in range(n))
        return ScheduledChunk(rid, tokens, start, tuple(table), _GREEDY)

    def prefill(self, length: int, batch: int) -> StepPlan:
        """`batch` prompts of `length` tokens."""
        return StepPlan(self._ids, tuple(self._chunk(0, length) for _ in range(batch)))

    def decode(self, batch: int, context: int) -> StepPlan:
        """One decode step of `batch` requests with `context` tokens of KV each."""
        return StepPlan(self._ids, tuple(self._chunk(context, 1) for _ in range(batch)))

    def release(self) -> None:
        for rid in range(self._ids + 1):
            self.blocks.free(str(rid))
