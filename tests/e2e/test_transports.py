"""Every KV migration transport between real Ray actors running the real SmolLM2 (1P1D):
the same greedy text, every migration over the transport asked for, no block leaked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import pytest

from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams
from distserve.runtime.transport import transfer_blocks

TRANSPORTS = ("gloo", "object-store", "shm")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@dataclass
class Run:
    """What one controller did with the prompts."""

    texts: list[str]
    migrations: dict[str, int]
    used_blocks: dict[str, int]
    worker_nice: list[int]


async def _serve(transport: str) -> Run:
    engine = EngineConfig(cache=CacheConfig(num_blocks=256))
    controller = Controller(engine, PlacementConfig(mode="disagg"), transport=transport)
    await controller.start()
    try:
        texts = []
        for prompt in PROMPTS:  # one at a time: a bf16 batch may round differently
            outputs = [o async for o in controller.stream(controller.submit(prompt, PARAMS))]
            assert outputs[-1].finished and len(outputs[-1].token_ids) == PARAMS.max_tokens
            texts.append(outputs[-1].text)
        used = {}
        for inst in controller.instances:
            inst.scheduler.blocks.check_integrity()
            used[inst.name] = inst.scheduler.blocks.num_used_blocks
        nice = [os.getpriority(os.PRIO_PROCESS, i.pid) for i in controller.instances if i.pid]
        return Run(texts, dict(controller.migration.completed), used, nice)
    finally:
        await controller.stop()


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {t: asyncio.run(_serve(t)) for t in TRANSPORTS}


@pytest.mark.slow  # real Ray actors running the real model
def test_same_text_over_every_transport(runs: dict[str, Run]) -> None:
    reference = runs[TRANSPORTS[0]].texts
    assert all(text for text in reference)
    for transport, run in runs.items():
        assert run.texts == reference, transport


@pytest.mark.slow  # real Ray actors running the real model
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_migration_used_the_transport(runs: dict[str, Run], transport: str) -> None:
    assert runs[transport].migrations == {transport: len(PROMPTS)}


@pytest.mark.slow  # real Ray actors running the real model
def test_workers_run_at_the_frontends_priority(runs: dict[str, Run]) -> None:
    """Ray's default nice 15 let the API server preempt the model it was waiting for."""
    for run in runs.values():
        assert run.worker_nice == [os.nice(0)] * 2, run.worker_nice


@pytest.mark.slow  # real Ray actors running the real model
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_block_is_free_at_the_end(runs: dict[str, Run], transport: str) -> None:
    used = runs[transport].used_blocks
    assert len(used) == 2 and all(n == 0 for n in used.values()), used


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        Controller(EngineConfig(), PlacementConfig(mode="disagg"), transport="carrier-pigeon")
    with pytest.raises(ValueError, match="without Ray"):
        Controller(EngineConfig(), PlacementConfig(mode="disagg"), use_ray=False, transport="gloo")


async def _abandon_transfers() -> tuple[list[str], int]:
    """Give up on gloo transfers at several points of the protocol, then make one more."""
    engine = EngineConfig(load_format="random", cache=CacheConfig(num_blocks=256))
    controller = Controller(engine, PlacementConfig(mode="disagg"), transport="gloo")
    await controller.start()
    try:
        prefill, decode = (i.executor for i in controller.instances)
        blocks = list(range(128))
        for timeout in (0.001, 0.03, 0.06, 0.1, 0.15):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(transfer_blocks(prefill, blocks, decode, blocks), timeout)
        stats = await transfer_blocks(prefill, blocks, decode, blocks)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            in_flight = await prefill.actor.num_sends_in_flight.remote()  # type: ignore[union-attr]
            if in_flight == 0:
                break
            await asyncio.sleep(0.1)
        return [stats.transport], in_flight
    finally:
        await controller.stop()


@pytest.mark.slow  # real Ray actors running the real model
def test_abandoned_gloo_transfers_leave_no_send_posted() -> None:
    """A transfer the controller gives up on (timeout) is still matched and released by
    the workers, and the pair of workers keeps working."""
    kinds, in_flight = asyncio.run(_abandon_transfers())
    assert kinds == ["gloo"] and in_flight == 0
