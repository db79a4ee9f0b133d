"""Layer-wise KV transfer (runtime/worker/layerwise.py): the KV a receiver gets layer by layer
during a prefill equals, bit for bit, the prefill's KV once its forward is over. And the
model runner's layer-wise KV store writes: the store holds the bytes the writes after the
forward put there."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distserve.core import Request, SamplingParams, ScheduledChunk, StepPlan
from distserve.core.kv_store import KVStore
from distserve.model.loader import load
from distserve.model.registry import ARCHITECTURES, ModelSource
from distserve.runtime.worker.kv_cache import KVCache, block_view, cache_shape
from distserve.runtime.worker.layerwise import LayerwiseSender, layer_rows, write_layer
from distserve.runtime.worker.model_runner import ModelRunner
from distserve.runtime.worker.synthetic import SyntheticPlans


def _runner(arch: str) -> ModelRunner:
    cfg = dataclasses.replace(ARCHITECTURES[arch], num_layers=3, vocab_size=1024)
    loaded = load(ModelSource(arch, "random", config=cfg), "bfloat16", "cpu", seed=1)
    return ModelRunner(loaded.model, KVCache(cfg, 32, 16, torch.bfloat16, "cpu"))


@pytest.mark.parametrize("arch", ["smollm2-135m", "opt-125m", "gpt2"])
def test_layerwise_kv_equals_kv_after_the_forward(arch: str) -> None:
    runner = _runner(arch)
    receiver = KVCache(runner.model.config, 32, 16, torch.bfloat16, "cpu")
    plans = SyntheticPlans(32, 16, runner.model.config.vocab_size, seed=3)
    plan = plans.prefill(70, 2)  # partial last blocks, two requests in one step
    blocks = [b for c in plan.chunks for b in c.block_table]
    dst = torch.tensor([31 - b for b in blocks])  # other block ids on the receiving side
    seen: list[int] = []

    def send(layer: int, data: torch.Tensor) -> None:
        seen.append(layer)
        write_layer(receiver, layer, dst, data)

    sender = LayerwiseSender(runner.cache, send)
    runner.on_layer = sender.layer_done
    sender.begin(blocks)
    runner.execute(plan)
    assert sender.end(timeout=30) == len(blocks) * runner.cache.bytes_per_block
    assert seen == [0, 1, 2]
    expected = runner.cache.read_blocks(blocks)
    assert torch.equal(receiver.read_blocks(dst.tolist()), expected)
    assert expected.abs().sum() > 0  # the prefill wrote KV at all

    sender.begin(blocks)  # a decode step does not call the hook
    runner.execute(plans.decode(1, 20))
    assert sender.end(timeout=30) == 0


def test_layerwise_send_error_is_raised_by_end() -> None:
    runner = _runner("smollm2-135m")
    plan = SyntheticPlans(32, 16, runner.model.config.vocab_size).prefill(20, 1)

    def send(layer: int, data: torch.Tensor) -> None:
        if layer == 1:
            raise ConnectionError("peer gone")

    sender = LayerwiseSender(runner.cache, send)
    runner.on_layer = sender.layer_done
    sender.begin(list(plan.chunks[0].block_table))
    runner.execute(plan)
    with pytest.raises(ConnectionError, match="peer gone"):
        sender.end(timeout=30)


def _store_steps(runner: ModelRunner, layerwise: bool) -> tuple[torch.Tensor, list[StepPlan]]:
    """Two steps through a fresh cache and store, their writes planned by the store's
    directory (core/kv_store.py) and committed after each step: (1) a prompt of 70 tokens
    (a partial last block) and the first 40-token chunk of another; (2) the first one's
    decode step, the other's last chunk (from mid-block) and a new 20-token prompt."""
    runner.cache.data.zero_()
    runner.layerwise_store = layerwise
    shape = cache_shape(runner.model.config, 24, 16)
    runner.store = block_view(torch.zeros(shape, dtype=torch.bfloat16))
    directory = KVStore(24, 16, "model")
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    vocab = runner.model.config.vocab_size
    prompts = {r: [(7 * i + k) % vocab for i in range(n)] for k, (r, n) in enumerate(
        [("a", 70), ("b", 70), ("c", 20)])}  # fmt: skip
    reqs = {r: Request(r, p, greedy, 0.0) for r, p in prompts.items()}
    tables = {"a": (0, 1, 2, 3, 4), "b": (5, 6, 7, 8, 9), "c": (10, 11)}
    step1 = StepPlan(1, (
        ScheduledChunk("a", tuple(prompts["a"]), 0, tables["a"], greedy),
        ScheduledChunk("b", tuple(prompts["b"][:40]), 0, tables["b"][:3], None),
    ))  # fmt: skip
    plan1, pending = directory.plan(step1, reqs)
    out = runner.execute(plan1)
    directory.commit(pending)
    reqs["a"].output_token_ids.append(out.sampled["a"])
    step2 = StepPlan(2, (
        ScheduledChunk("a", (out.sampled["a"],), 70, tables["a"], greedy, output_index=1),
        ScheduledChunk("b", tuple(prompts["b"][40:]), 40, tables["b"], greedy),
        ScheduledChunk("c", tuple(prompts["c"]), 0, tables["c"], greedy),
    ))  # fmt: skip
    plan2, pending = directory.plan(step2, reqs)
    runner.execute(plan2)
    directory.commit(pending)
    return runner.store, [plan1, plan2]


@pytest.mark.parametrize("arch", ["smollm2-135m", "gpt2"])
def test_layerwise_store_writes_equal_writes_after_the_forward(arch: str) -> None:
    runner = _runner(arch)
    rows = layer_rows(runner.cache)
    seen: list[int] = []

    def check(layer: int) -> None:  # runs after the runner's store copy of this layer
        seen.append(layer)
        assert runner.store is not None
        if len(seen) <= 3:  # the first step, into an empty store: layers up to this one only
            assert runner.store[layer * rows : (layer + 1) * rows].any()
            assert not runner.store[(layer + 1) * rows :].any()

    runner.on_layer = check  # chained after the store's copies, not replaced by them
    layerwise, plans = _store_steps(runner, layerwise=True)
    assert seen == [0, 1, 2] * 2  # both steps have prefill chunks
    runner.on_layer = None
    after, _ = _store_steps(runner, layerwise=False)
    # the steps cover what they should: partial writes (a partial last block, a chunk from
    # mid-block, a decode token) beside whole blocks, prefill and decode in one step
    writes = [w for p in plans for w in p.store_writes]
    assert any(w[2] > 0 for w in writes) and any(w[3] < 16 for w in writes)
    assert any(w[2:] == (0, 16) for w in writes)
    assert plans[1].prefill_chunks and plans[1].decode_chunks
    assert torch.equal(layerwise.view(torch.int16), after.view(torch.int16))
    used = sorted({s for _, s, _, _ in writes})
    assert layerwise[:, used].abs().sum() > 0
    unused = [s for s in range(24) if s not in used]
    assert not layerwise[:, unused].any()
