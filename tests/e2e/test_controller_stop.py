"""Stopping the controller ends its background tasks. Python 3.11's asyncio.wait_for
swallows a cancel that arrives as the awaited call finishes; the recovery loop pinged
every instance through it, so with emulated workers (whose pings finish at once) a stop
left that loop running most of the time and `asyncio.run` then hung at exit."""

from __future__ import annotations

import asyncio

from distserve.cluster.controller import Controller
from distserve.config import EmulationConfig, EngineConfig, PlacementConfig


def test_stop_ends_the_recovery_loop_while_it_pings() -> None:
    emulation = EmulationConfig(tokenizer="bytes", devices_per_node=8)
    placement = PlacementConfig(mode="colocated", num_instances=8, emulated=True)

    async def run() -> list[bool]:
        ended = []
        for _ in range(10):
            controller = Controller(
                EngineConfig(model="opt-13b"), placement, emulation=emulation, degrade_after=None
            )
            controller.recovery.ping_interval = 0.0  # ping all the time
            await controller.start()
            tasks = list(controller._tasks)
            for _ in range(50):  # let it loop through pings
                await asyncio.sleep(0)
            await controller.stop()
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            ended.append(not pending)
            for task in pending:  # do not leave them to hang the loop's exit
                while not task.done():
                    task.cancel()
                    await asyncio.sleep(0)
        return ended

    assert all(asyncio.run(run()))


def test_a_stopped_controller_frees_its_models_without_a_garbage_collection() -> None:
    """The controller's objects refer to each other, so a model held by them would wait
    for a full collection: two test servers' workers once reached 11 GiB that way. A stop
    lets go of each in-process worker (and closing twice is harmless)."""
    import gc
    import weakref

    import torch

    from distserve.core import CacheConfig, SamplingParams

    engine = EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=64))

    async def run() -> tuple[Controller, list[weakref.ref[torch.nn.Module]]]:
        c = Controller(engine, PlacementConfig(mode="disagg"), use_ray=False)
        await c.start()
        [_ async for _ in c.stream(c.submit("Hello there", SamplingParams(max_tokens=4)))]
        models = [weakref.ref(i.executor.worker.runner.model) for i in c.instances]  # type: ignore[attr-defined]
        await c.stop()
        await c.stop()
        return c, models

    gc.disable()
    try:
        controller, models = asyncio.run(run())
        assert len(models) == 2 and all(m() is None for m in models)
        assert controller.instances  # the controller itself is still here
    finally:
        gc.enable()
