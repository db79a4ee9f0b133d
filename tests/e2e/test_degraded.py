"""Degraded modes (cluster/degraded.py) on the real controller with emulated devices:
when a role stays down (its worker dead, every restart failing), the other role serves
end to end; nothing is lost, and the roles return when the missing one is back."""

from __future__ import annotations

import asyncio

import pytest

from distserve.cluster.controller import Controller
from distserve.config import PlacementConfig
from distserve.core import SamplingParams
from distserve.runtime.instance import Instance, Role
from tests.e2e.test_emulated import assert_all_blocks_free, emulated
from tests.e2e.test_recovery import outcome

PARAMS = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0)


def gated(controller: Controller) -> asyncio.Event:
    """Restarts fail until the returned event is set (a role that cannot come back)."""
    allowed, replace = asyncio.Event(), controller.recovery.replace

    async def maybe(dead: Instance) -> Instance:
        if not allowed.is_set():
            raise RuntimeError(f"{dead.name} cannot be restarted yet")
        return await replace(dead)

    controller.recovery.replace = maybe
    controller.recovery.max_backoff = 0.2
    return allowed


@pytest.mark.parametrize("lost", ["decode", "prefill"])
def test_the_other_role_covers_until_the_lost_one_is_back(lost: str) -> None:
    async def run() -> None:
        c = emulated(PlacementConfig(mode="disagg"))
        await c.start()
        try:
            assert c.degraded is not None
            c.degraded.after = 0.3
            allowed = gated(c)
            stream = c.emulated.tokens  # type: ignore[union-attr]
            expected = [stream[i % len(stream)] for i in range(PARAMS.max_tokens)]
            states = [c.submit(f"request {i} " * 20, PARAMS) for i in range(4)]
            tasks = [asyncio.create_task(outcome(c, s)) for s in states]
            await asyncio.sleep(0.2)  # some decoding
            victim = 1 if lost == "decode" else 0
            c.instances[victim].executor.worker.kill()  # type: ignore[union-attr]
            more = [c.submit(f"late {i} " * 20, PARAMS) for i in range(3)]
            tasks += [asyncio.create_task(outcome(c, s)) for s in more]
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert outs == [expected] * len(outs)  # all served, nothing repeated or lost
            cover = c.instances[1 - victim]
            assert cover.role == Role.COLOCATED and cover.name in c.degraded.covering
            assert lost in (c.degraded.reason or "")
            allowed.set()  # the lost role comes back: the cover returns to its role
            for _ in range(100):
                await asyncio.sleep(0.1)
                if not c.degraded.covering and c.instances[victim].alive:
                    break
            assert [i.role for i in c.instances] == [Role.PREFILL, Role.DECODE]
            out = await outcome(c, c.submit("after recovery " * 20, PARAMS))
            assert out == expected
            assert sum(c.migration.completed.values()) >= 1
            assert_all_blocks_free(c)
        finally:
            await c.stop()

    asyncio.run(run())
