"""Executes a `StepPlan` on a model: builds the batch tensors, runs one forward pass over
the paged cache, and samples where the plan asks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from distserve.core import ScheduledChunk, StepPlan, StepResult
from distserve.model.attention import AttentionMetadata, PrefillSpan
from distserve.model.base import CausalLM
from distserve.model.kernels import cpu_kernels
from distserve.runtime.kv_store import write_to_store
from distserve.runtime.worker.kv_cache import KVCache
from distserve.runtime.worker.sampler import Sampler


class ModelRunner:
    """The executor of one instance: owns the model and the KV cache tensors.

    Holds no per-request state: everything a step needs is in the plan, so the runner
    may be a Ray actor in another process, and a request may move between runners.
    """

    def __init__(self, model: CausalLM, cache: KVCache, seed: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.store: torch.Tensor | None = None
        """The KV store's slots (runtime/kv_store.py), once mapped: plans' store_writes."""
        self.on_layer: Callable[[int], None] | None = None
        """Called with i once layer i of a step with prefill chunks has written its KV (a
        `LayerwiseSender.layer_done`, runtime/worker/layerwise.py): not set when serving
        (the KV store's layer-wise writes chain their own hook before it)."""
        self.layerwise_store = True
        """A step with prefill chunks writes its `store_writes` layer by layer, each layer's
        rows as that layer finishes (False: all of them after the forward, as decode-only
        steps do). On one CPU core the two measure the same, within noise
        (benchmarks/kv_store.py --layerwise)."""
        self.device = cache.data.device
        self.sampler = Sampler(self.device, seed)
        if self.device.type == "cpu":
            cpu_kernels()  # build or load now, not in the middle of the first decode step

    @torch.inference_mode()
    def execute(self, plan: StepPlan, hidden: torch.Tensor | None = None) -> StepResult:
        """Run the plan; a pipeline stage after the first starts from the previous
        stage's `hidden` (see `execute_stage`)."""
        out = self.execute_stage(plan, hidden)
        assert isinstance(out, StepResult), "a stage before the last: use execute_stage"
        return out

    @torch.inference_mode()
    def execute_stage(
        self, plan: StepPlan, hidden_in: torch.Tensor | None = None
    ) -> StepResult | torch.Tensor:
        """`execute`, or for a pipeline stage before the last the hidden states [T, h]
        it hands to the next stage."""
        t0 = time.perf_counter()
        self.cache.swap_out(plan.swap_out)
        self.cache.swap_in(plan.swap_in)
        self.cache.copy_blocks(plan.block_copies)
        if plan.store_reads:  # prefix blocks another instance computed
            if self.store is None:
                raise RuntimeError("a plan reads from a KV store this worker has not mapped")
            slots, blocks = zip(*plan.store_reads, strict=True)
            self.cache.copy_from(self.store, list(slots), list(blocks))
        if not plan.chunks:
            if not self.model.last_stage:
                return torch.empty(0, device=self.device)
            return StepResult(elapsed=time.perf_counter() - t0)
        chunks = list(plan.prefill_chunks) + list(plan.decode_chunks)
        input_ids, positions, meta = self._prepare(chunks)
        hook = self.on_layer if plan.prefill_chunks else None
        if plan.store_writes and self.store is None:
            raise RuntimeError("a plan writes to a KV store this worker has not mapped")
        layerwise = bool(plan.store_writes and plan.prefill_chunks and self.layerwise_store)
        if layerwise:
            hook = self._store_layers(plan.store_writes, hook)
        hidden = self.model(input_ids, positions, self.cache.layers, meta, hidden_in, hook)
        if plan.store_writes and not layerwise:
            assert self.store is not None
            write_to_store(self.cache.blocks, self.store, plan.store_writes, self.cache.block_size)
        if not self.model.last_stage:
            return hidden
        rows, sampled_chunks, offset = [], [], 0
        for c in chunks:
            offset += c.num_tokens
            if c.sampling_params is not None:
                rows.append(offset - 1)
                sampled_chunks.append(c)
        result = StepResult(elapsed=0.0)
        if rows:
            logits = self.model.compute_logits(hidden[rows]).float()
            params = [c.sampling_params for c in sampled_chunks]
            tokens, logprobs = self.sampler(
                logits, params, [c.output_index for c in sampled_chunks],
                [c.allowed_tokens for c in sampled_chunks],
            )  # type: ignore[arg-type]  # fmt: skip
            ids = [c.request_id for c in sampled_chunks]
            result = StepResult(
                sampled=dict(zip(ids, tokens, strict=True)),
                logprobs={i: lp for i, lp in zip(ids, logprobs, strict=True) if lp is not None},
            )
        return StepResult(result.sampled, result.logprobs, time.perf_counter() - t0)

    def _store_layers(
        self, writes: tuple[tuple[int, int, int, int], ...], then: Callable[[int], None] | None
    ) -> Callable[[int], None]:
        """An `on_layer` hook that copies layer i's rows of `writes` into the store as soon
        as layer i has written its KV (inline: the last layer's copy is done when the
        forward returns, so the step's writes have landed when it does), then calls `then`.
        Every row of a block is final once its layer is done: copy-on-write, swap-in and
        store reads ran before the forward, and later layers write other rows."""
        cache, store, bs = self.cache, self.store, self.cache.block_size
        assert store is not None
        rows = cache.blocks.shape[0] // len(cache.layers)

        def on_layer(i: int) -> None:
            write_to_store(cache.blocks, store, writes, bs, slice(i * rows, (i + 1) * rows))
            if then is not None:
                then(i)

        return on_layer

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        spans: list[PrefillSpan] = []
        decodes: list[ScheduledChunk] = []
        for c in chunks:
            ids.extend(c.token_ids)
            if not c.is_prefill:
                decodes.append(c)
                continue
            ctx_slots = _slots(self._tensor(list(c.block_table)), c.context_len, bs)
            positions.append(torch.arange(c.start, c.context_len, device=self.device))
            slots.append(ctx_slots[c.start :])
            spans.append(
                PrefillSpan(
                    len(ids) - c.num_tokens, c.num_tokens, c.start, ctx_slots if c.start else None
                )
            )
        meta = AttentionMetadata(torch.empty(0), spans, sum(s.num_tokens for s in spans), bs)
        if decodes:
            longest = max(c.context_len for c in decodes)
            width = -(-longest // bs)
            tables = [list(c.block_table[:width]) for c in decodes]
            meta.decode_blocks = self._tensor([t + [0] * (width - len(t)) for t in tables])
            lens = self._tensor([c.context_len for c in decodes])
            meta.decode_lens = lens
            last = lens - 1
            positions.append(last)
            slots.append(
                meta.decode_blocks.gather(1, (last // bs)[:, None]).squeeze(1) * bs + last % bs
            )
        meta.slot_mapping = torch.cat(slots)
        return self._tensor(ids), torch.cat(positions), meta

    def _tensor(self, data: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)


def _slots(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions 0 .. length-1 of a request with this block table."""
    pos = torch.arange(length, device=table.device)
    return table[pos // block_size] * block_size + pos % block_size
