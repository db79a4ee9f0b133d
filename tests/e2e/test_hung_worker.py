"""A worker that stops answering (its process stopped with SIGSTOP: a real Ray actor
running the real SmolLM2) is failed only once it has left `ping_misses` pings in a row
unanswered: one slow answer, as on a machine short of CPU, is not a death; a worker that
stays silent is failed, its request rescued and the instance restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from distserve.cluster.controller import Controller
from distserve.config import EngineConfig, PlacementConfig
from distserve.core import CacheConfig, SamplingParams

pytestmark = pytest.mark.slow  # real Ray actors, the real model

PING_TIMEOUT = 2.0
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


async def _paused(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_slow_ping_is_not_a_death_a_silent_worker_is() -> None:
    async def run() -> None:
        engine = EngineConfig(cache=CacheConfig(num_blocks=128))
        controller = Controller(engine, PlacementConfig(mode="disagg"))
        await controller.start()
        try:
            recovery = controller.recovery
            recovery.ping_interval, recovery.ping_timeout = 0.2, PING_TIMEOUT
            decode = next(i for i in controller.instances if i.name == "decode-0")
            assert decode.pid is not None
            # stopped a little longer than one ping's timeout: one ping is missed, the next
            # is answered once the process runs again
            await _paused(decode.pid, PING_TIMEOUT + 0.5)
            await asyncio.sleep(2 * PING_TIMEOUT)
            assert decode.alive and recovery.failures == 0
            state = controller.submit("The capital of France is", PARAMS)
            out = [o async for o in controller.stream(state)][-1]
            assert len(out.token_ids) == PARAMS.max_tokens

            # stopped for good (until after it is failed): the instance is failed after two
            # unanswered pings and restarted; the request in flight still finishes
            state = controller.submit("def fibonacci(n):", PARAMS)
            pid = decode.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                while recovery.failures == 0:
                    assert time.monotonic() - t0 < 6 * PING_TIMEOUT, "never failed"
                    await asyncio.sleep(0.1)
                assert time.monotonic() - t0 > 1.5 * PING_TIMEOUT, "failed at the first miss"
            finally:
                os.kill(pid, signal.SIGCONT)
            out = [o async for o in controller.stream(state)][-1]
            assert len(out.token_ids) == PARAMS.max_tokens
        finally:
            await controller.stop()

    asyncio.run(run())
