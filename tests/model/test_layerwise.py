"""Layer-wise KV transfer (runtime/worker/layerwise.py): the KV a receiver gets layer by layer
during a prefill equals, bit for bit, the prefill's KV once its forward is over."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distserve.model.loader import load
from distserve.model.registry import ARCHITECTURES, ModelSource
from distserve.runtime.worker.kv_cache import KVCache
from distserve.runtime.worker.layerwise import LayerwiseSender, write_layer
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
