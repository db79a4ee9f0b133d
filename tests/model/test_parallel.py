"""Tensor- and pipeline-parallel instances (model/parallel.py, runtime/parallel_executor.py):
greedy outputs equal tp=1 pp=1 token for token in float32, batched, colocated and across
migrations between any two (tp, pp) shapes; nothing leaks."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams, ScheduledChunk, StepPlan
from distserve.core.shards import kv_parts, stage_layers
from distserve.model.config import ModelConfig
from distserve.model.parallel import check_parallel
from distserve.model.registry import ARCHITECTURES
from distserve.runtime.parallel_executor import offset_plan, split_cores

TINY = {
    "tiny-llama-par": ModelConfig(
        arch="llama", vocab_size=384, hidden_size=64, num_layers=3, num_heads=8,
        num_kv_heads=4, intermediate_size=128, max_position_embeddings=256, name="tiny-llama-par",
    ),
    "tiny-opt-par": ModelConfig(
        arch="opt", vocab_size=386, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
        intermediate_size=128, max_position_embeddings=256, activation="relu",
        name="tiny-opt-par",
    ),
}  # fmt: skip
"""Random-weight configs: 8 and 4 heads split 2 and 4 ways, 3 layers split 2 (uneven) and
3 ways; OPT's vocabulary of 386 does not divide by 4 (its last slice is padded)."""

PROMPTS = [
    list(range(5, 40)),
    [7, 3, 9, 11, 200, 17, 3],
    list(range(100, 180, 3)),
    [42] * 20,
]
Tokens = list[int]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def generate(
    model: str, placement: PlacementConfig, load_format: str = "random"
) -> list[list[int]]:
    """Greedy outputs of every prompt, all submitted at once (batched steps), on in-process
    workers; checks every instance's blocks are all free at the end."""
    engine = EngineConfig(
        model=model, load_format=load_format, dtype="float32", cache=CacheConfig(num_blocks=96)
    )

    async def run() -> list[Tokens]:
        c = Controller(engine, placement, use_ray=False)
        await c.start()
        try:

            async def one(prompt: list[int]) -> list[int]:
                outs = [o async for o in c.stream(c.submit(prompt, GREEDY))]
                assert outs[-1].finished
                return list(outs[-1].token_ids)

            tokens = await asyncio.gather(*(one(p) for p in PROMPTS))
            for inst in c.instances:
                inst.scheduler.blocks.check_integrity()
                assert inst.scheduler.blocks.num_used_blocks == 0, inst.name
            if placement.mode == "disagg":
                assert sum(c.migration.completed.values()) == len(PROMPTS)
            return list(tokens)
        finally:
            await c.stop()

    return asyncio.run(run())


@pytest.fixture
def tiny_models(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, cfg in TINY.items():
        monkeypatch.setitem(ARCHITECTURES, name, cfg)


SHAPES = [
    dict(mode="colocated", num_instances=1, prefill_tp=2),
    dict(mode="colocated", num_instances=1, prefill_tp=4),
    dict(mode="colocated", num_instances=1, prefill_pp=2),
    dict(mode="colocated", num_instances=1, prefill_pp=3),
    dict(mode="disagg", prefill_tp=2, decode_tp=1),
    dict(mode="disagg", prefill_tp=1, decode_tp=4),
    dict(mode="disagg", prefill_pp=3, decode_tp=2, decode_pp=2),
    dict(mode="disagg", prefill_tp=4, prefill_pp=2, decode_pp=3),
]


@pytest.mark.parametrize("model", sorted(TINY))
def test_parallel_shapes_match_one_worker(tiny_models: None, model: str) -> None:
    reference = generate(model, PlacementConfig(mode="colocated", num_instances=1))
    assert all(len(t) == GREEDY.max_tokens for t in reference)
    for shape in SHAPES:
        assert generate(model, PlacementConfig(**shape)) == reference, shape  # type: ignore[arg-type]


def test_a_shape_the_heads_do_not_divide_is_refused_by_name() -> None:
    smollm2 = ARCHITECTURES["smollm2-135m"]
    with pytest.raises(ValueError, match="9 attention heads and 3 KV heads: tp=2"):
        check_parallel(smollm2, 2, 1)
    check_parallel(smollm2, 3, 2)
    with pytest.raises(ValueError, match="30 layers: too few for pp=31"):
        check_parallel(smollm2, 1, 31)
    gpt2 = dataclasses.replace(smollm2, arch="gpt2")
    with pytest.raises(ValueError, match="llama, opt families, not gpt2"):
        check_parallel(gpt2, 3, 1)


def test_stages_cover_the_layers_in_order() -> None:
    stages = [stage_layers(30, s, 4) for s in range(4)]
    assert [len(r) for r in stages] == [8, 8, 7, 7]
    assert [i for r in stages for i in r] == list(range(30))
    parts = kv_parts(30, 3, 3, 2)  # SmolLM2's 3 KV heads, tp3 pp2
    assert [(p.layers, p.heads) for p in parts[1]] == [
        (range(15, 30), range(h, h + 1)) for h in range(3)
    ]
    with pytest.raises(ValueError, match="3 KV heads do not divide by tp=2"):
        kv_parts(30, 3, 2, 1)


def test_slot_plans_and_core_shares() -> None:
    chunk = ScheduledChunk("r", (1, 2), 0, (0, 3), None)
    plan = StepPlan(1, (chunk,), swap_out=((3, 1),), swap_in=((0, 2),), block_copies=((3, 4),))
    moved = offset_plan(plan, 100, 10)
    assert moved.chunks[0].block_table == (100, 103)
    assert (moved.swap_out, moved.swap_in, moved.block_copies) == (
        ((103, 11),),
        ((10, 102),),
        ((103, 104),),
    )
    assert offset_plan(plan, 0, 0) is plan
    assert split_cores([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_cores([0, 1], 3) == [[0], [1], [0]]


@pytest.mark.slow  # a real server, Ray actors, the real model
def test_server_with_a_tp3_prefill_instance() -> None:
    """The paper's OPT-13B shape (a tensor-parallel prefill) through the HTTP API, its KV
    migrating to a decode instance of 2 pipeline stages: SmolLM2's 9 heads go 3 ways, its
    30 layers 2 ways; float32 outputs equal the offline engine's."""
    from distserve.bench.server_process import running_server
    from distserve.llm import LLM

    prompt = "The three primary colors are"
    offline = LLM("smollm2-135m", dtype="float32", num_blocks=64)
    expected = offline.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
    del offline
    args = ("--dtype", "float32", "--prefill-tp", "3", "--decode-pp", "2")
    with running_server(*args) as url:
        body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.text
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'distserve_migrations_total{model_name="smollm2-135m"} 1.0' in metrics


@pytest.mark.slow  # real Ray actors, the real model, a SIGKILL
def test_a_killed_rank_restarts_its_whole_instance() -> None:
    """SIGKILL of one tensor rank of the prefill instance while requests run: the instance
    (all of its ranks) is replaced, no request is lost and outputs equal an unfaulted run."""
    import os
    import signal

    engine = EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=128))
    placement = PlacementConfig(mode="disagg", prefill_tp=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [f"Story number {i}: once upon a time" for i in range(4)]

    async def run() -> None:
        c = Controller(engine, placement)
        await c.start()
        try:

            async def one(prompt: str) -> list[int]:
                return list([o async for o in c.stream(c.submit(prompt, params))][-1].token_ids)

            reference = await asyncio.gather(*(one(p) for p in prompts))
            prefill = c.instances[0]
            infos = await prefill.executor.group.infos()  # type: ignore[union-attr]
            victim = infos[0][1].pid
            tasks = [asyncio.create_task(one(p)) for p in prompts]
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            assert await asyncio.wait_for(asyncio.gather(*tasks), 300) == reference
            for _ in range(600):  # the replacement loads
                if c.recovery.restarts:
                    break
                await asyncio.sleep(0.5)
            assert c.recovery.restarts == 1
            assert await one(prompts[0]) == reference[0]  # served by the new instance
            new = c.instances[0]
            assert new is not prefill and new.alive
            new_pids = [i.pid for s in await new.executor.group.infos() for i in s]  # type: ignore[union-attr]
            assert victim not in new_pids and len(new_pids) == 3
            import ray

            for _ in range(20):  # the dead instance's live ranks are ended too
                alive = [a for a in ray.util.list_named_actors() if "-prefill-" in a]
                if len(alive) == 3:
                    break
                await asyncio.sleep(0.5)
            assert len(alive) == 3, alive
            for inst in c.instances:
                inst.scheduler.blocks.check_integrity()
                assert inst.scheduler.blocks.num_used_blocks == 0, inst.name
        finally:
            await c.stop()

    asyncio.run(run())


@pytest.mark.gpu
def test_pipeline_stages_on_one_gpu() -> None:
    reference = generate(
        "smollm2-135m", PlacementConfig(mode="colocated", num_instances=1), "auto", "cuda"
    )
    shape = PlacementConfig(mode="colocated", num_instances=1, prefill_pp=2)
    assert generate("smollm2-135m", shape, "auto", "cuda") == reference


@pytest.mark.gpu
def test_tensor_parallel_over_nccl() -> None:
    """tp=3 across three GPUs (NCCL), a Ray actor per GPU; skipped with fewer."""
    import torch

    if torch.cuda.device_count() < 3:
        pytest.skip("needs 3 GPUs")
    reference = generate(
        "smollm2-135m", PlacementConfig(mode="colocated", num_instances=1), "auto", "cuda", True
    )
    shape = PlacementConfig(mode="disagg", prefill_tp=3, decode_tp=1)
    assert generate("smollm2-135m", shape, "auto", "cuda", True) == reference
