"""Recovery that never gives up (cluster/recovery.py), on emulated devices: the real
controller, schedulers and migration protocol, no Ray, so a fault during a restart can be
replayed exactly. A restart that fails is retried with backoff until it runs; while a
role has no live instance its requests wait `orphan_timeout` s and then fail; /metrics
keeps no numbers of a dead instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from distserve.cluster.controller import Controller, RequestFailed
from distserve.cluster.request_table import RequestState
from distserve.config import PlacementConfig
from distserve.core import SamplingParams
from distserve.runtime.instance import Instance
from distserve.server.metrics import Metrics
from tests.e2e.test_emulated import assert_all_blocks_free, emulated

PARAMS = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0)


def failing_first(
    replace: Callable[[Instance], Awaitable[Instance]], times: int | None
) -> Callable[[Instance], Awaitable[Instance]]:
    """`replace` that fails its first `times` calls (None: every call), as a replacement
    killed while it loads does (tests/e2e/test_faults.py causes that for real on Ray)."""
    calls = 0

    async def flaky(dead: Instance) -> Instance:
        nonlocal calls
        calls += 1
        if times is None or calls <= times:
            raise RuntimeError(f"the replacement of {dead.name} died while loading")
        return await replace(dead)

    return flaky


async def outcome(controller: Controller, state: RequestState) -> list[int] | str:
    """The request's tokens, or the error it ended with."""
    try:
        return [o async for o in controller.stream(state)][-1].token_ids
    except RequestFailed as e:
        return str(e)


def metric_lines(controller: Controller, instance: str) -> list[str]:
    metrics = Metrics()
    metrics.attach(controller)
    text = metrics.render().decode()
    return [ln for ln in text.splitlines() if f'instance="{instance}"' in ln]


def test_a_failed_restart_is_retried_until_the_role_is_back() -> None:
    async def run() -> None:
        controller = emulated(PlacementConfig(mode="disagg"))
        await controller.start()
        try:
            recovery = controller.recovery
            recovery.replace = failing_first(recovery.replace, 2)
            states = [controller.submit(f"request {i} " * 20, PARAMS) for i in range(4)]
            tasks = [asyncio.create_task(outcome(controller, s)) for s in states]
            await asyncio.sleep(0.3)  # ~10 decode steps in
            controller.instances[1].executor.worker.kill()  # type: ignore[union-attr]
            await asyncio.sleep(1.5)  # the first try has failed; the second waits 1 s
            assert "died while loading" in recovery.restart_errors["decode-0"]
            assert recovery.restart_attempts["decode-0"] >= 1
            # down: only `up` is left of it, at 0
            assert metric_lines(controller, "decode-0") == [
                'distserve_instance_up{instance="decode-0",model_name="",role="decode"} 0.0'
            ]
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            stream = controller.emulated.tokens  # type: ignore[union-attr]
            for out in outs:  # the third try ran: nothing lost, nothing repeated
                assert out == [stream[i % len(stream)] for i in range(40)]
            assert recovery.restarts == 1
            assert not recovery.restart_errors and not recovery.restart_attempts
            assert any("kv_blocks" in ln for ln in metric_lines(controller, "decode-0"))
            assert_all_blocks_free(controller)
        finally:
            await controller.stop()

    asyncio.run(run())


def test_requests_for_a_role_that_stays_down_fail_within_the_bound() -> None:
    async def run() -> None:
        controller = emulated(PlacementConfig(mode="disagg"))
        controller.recovery.orphan_timeout = 1.0
        await controller.start()
        try:
            controller.recovery.replace = failing_first(controller.recovery.replace, None)
            states = [controller.submit(f"request {i} " * 20, PARAMS) for i in range(4)]
            tasks = [asyncio.create_task(outcome(controller, s)) for s in states]
            await asyncio.sleep(0.3)
            controller.instances[1].executor.worker.kill()  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
            late = controller.submit("a request that arrives while decode is down", PARAMS)
            t0 = time.monotonic()
            outs = await asyncio.wait_for(asyncio.gather(*tasks, outcome(controller, late)), 10)
            # the bound (1 s) plus the watcher's period (1 s), with room for a busy machine
            assert time.monotonic() - t0 < 6
            for out in outs:
                assert isinstance(out, str) and "for a decode instance" in out, out
            assert not controller.table.requests
            prefill = controller.instances[0]
            assert prefill.alive and prefill.scheduler.blocks.num_used_blocks == 0
        finally:
            await controller.stop()

    asyncio.run(run())
