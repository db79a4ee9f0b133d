"""Role flips (cluster/flip.py) under load on the real model: an instance turns prefill ->
decode -> prefill, or colocated -> disaggregated, or colocated instances turn chunked
prefill on and off, without reloading; no request is lost or duplicated, greedy float32
outputs equal an undisturbed run, every block is free after."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import pytest

from distserve.cluster.adaptive import Adaptive, AdaptiveConfig
from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, RequestStatus, SamplingParams, SchedulerConfig
from distserve.runtime.instance import Role

ENGINE = EngineConfig(
    dtype="float32",
    cache=CacheConfig(num_blocks=320),
    # a prefill queue builds up, so that flips have queued work to move
    scheduler=SchedulerConfig(max_num_batched_tokens=400, max_model_len=400),
)
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
STORY = "The old lighthouse keeper counted the ships that passed each night. " * 12
PROMPTS = [f"{STORY} Question {i}: what is {i} times {i + 3}? Answer:" for i in range(12)]


async def _serve(
    placement: PlacementConfig,
    flips: list[tuple[str, str]],
    switch: Callable[[Controller], Awaitable[None]] | None = None,
) -> tuple[list[list[int]], Controller]:
    """Outputs of PROMPTS: the first half sent together, the flips made one after the
    other while they run (a prefill step takes two prompts: the rest queue), `switch`
    then, then the second half."""
    gc.collect()  # the earlier runs' workers: their models (GiBs) sit in reference cycles
    c = Controller(ENGINE, placement, use_ray=False)
    await c.start()
    try:

        async def one(prompt: str) -> list[int]:
            return list([o async for o in c.stream(c.submit(prompt, PARAMS))][-1].token_ids)

        half = len(PROMPTS) // 2
        tasks = [asyncio.create_task(one(p)) for p in PROMPTS[:half]]
        while len(c.table.requests) < half:
            await asyncio.sleep(0.001)
        for name, role in flips:
            await c.flip(name, role)
        if switch is not None:
            await switch(c)
        tasks += [asyncio.create_task(one(p)) for p in PROMPTS[half:]]
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        for inst in c.instances:
            inst.scheduler.blocks.check_integrity()
            assert inst.scheduler.blocks.num_used_blocks == 0, inst.name
            assert not inst.scheduler.has_unfinished()
        return outs, c
    finally:
        await c.stop()


@pytest.mark.slow  # the real model in three in-process workers
def test_flips_under_load_lose_nothing() -> None:
    async def run() -> None:
        two_one = PlacementConfig(mode="disagg", num_prefill=2, num_decode=1)
        reference, _ = await _serve(two_one, [])
        assert all(len(t) == PARAMS.max_tokens for t in reference)
        flips = [("prefill-1", "decode"), ("prefill-1", "prefill")]
        outs, c = await _serve(two_one, flips)
        assert outs == reference
        assert [(f.instance, f.old, f.new) for f in c.flips.done] == [
            ("prefill-1", "prefill", "decode"),
            ("prefill-1", "decode", "prefill"),
        ]
        assert [i.role for i in c.instances] == [Role.PREFILL, Role.PREFILL, Role.DECODE]
        assert c.flips.done[0].moved > 0  # prompts queued on prefill-1 went to prefill-0
        # colocated -> disaggregated, one instance at a time
        colocated = PlacementConfig(mode="colocated", num_instances=2)
        outs, c = await _serve(colocated, [("colocated-1", "decode"), ("colocated-0", "prefill")])
        assert outs == reference
        assert [i.role for i in c.instances] == [Role.PREFILL, Role.DECODE]
        assert sum(c.migration.completed.values()) > 0  # later requests migrated

    asyncio.run(run())


@pytest.mark.slow  # the real model in two in-process workers
def test_chunked_prefill_switched_on_and_off_under_load_loses_nothing() -> None:
    """Adaptive re-planning's 'chunked' layout: both colocated instances turn chunked
    prefill on in place (Adaptive.apply, Flips.rechunk), and off again while a prompt is
    partly computed in chunks; it finishes whole, and every output equals the reference."""
    partial: list[str] = []

    async def switch(c: Controller) -> None:
        adaptive = Adaptive(c, AdaptiveConfig("a100", 1.0, 1.0, chunk=48))
        await adaptive.apply((0, 0, 0, 2))
        for _ in range(30_000):  # a prompt computed in part: chunking off now
            partial.extend(
                r.request_id
                for i in c.instances
                for r in i.scheduler.running
                if r.status == RequestStatus.PREFILLING and r.num_computed_tokens > 0
            )
            if partial:
                break
            await asyncio.sleep(0.001)
        await adaptive.apply((0, 0, 2, 0))

    async def run() -> None:
        colocated = PlacementConfig(mode="colocated", num_instances=2)
        reference, _ = await _serve(colocated, [])
        outs, c = await _serve(colocated, [], switch)
        assert partial
        assert outs == reference
        assert sorted((f.old, f.new) for f in c.flips.done) == [
            ("chunked", "colocated"), ("chunked", "colocated"),
            ("colocated", "chunked"), ("colocated", "chunked"),
        ]  # fmt: skip
        assert all(not i.scheduler.config.chunked_prefill for i in c.instances)

    asyncio.run(run())


@pytest.mark.slow  # the real model in two in-process workers
def test_flips_that_would_strand_requests_are_refused() -> None:
    async def run() -> None:
        c = Controller(ENGINE, PlacementConfig(mode="disagg"), use_ray=False)
        await c.start()
        try:
            with pytest.raises(ValueError, match="leaves prefill without decode"):
                await c.flip("decode-0", "prefill")
            with pytest.raises(ValueError, match="leaves no instance for prompts"):
                await c.flip("prefill-0", "decode")
            with pytest.raises(ValueError, match="already prefill"):
                await c.flip("prefill-0", "prefill")
            with pytest.raises(ValueError, match="no instance 'decode-7'"):
                await c.flip("decode-7", "prefill")
            with pytest.raises(ValueError, match="role must be prefill, decode or colocated"):
                await c.flip("decode-0", "verify")
            with pytest.raises(ValueError, match="leaves prefill without decode"):
                await c.flip("decode-0", "colocated")
            for name in ("prefill-0", "decode-0"):  # to colocated: each takes prompts
                await c.flip(name, "colocated")
                out = [o async for o in c.stream(c.submit("Hello", PARAMS))][-1]
                assert len(out.token_ids) == PARAMS.max_tokens
        finally:
            await c.stop()

    asyncio.run(run())
