"""Adaptive re-planning (cluster/adaptive.py) on the real controller with emulated A100s
(OPT-13B): the live window's requests are replayed in the simulator on every layout of the
two instances, and roles flip to the best one after the dwell time, in both directions."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from distserve.cluster.adaptive import Adaptive, AdaptiveConfig, layouts, predict
from distserve.cluster.live import Finished, LiveWindow
from distserve.config import PlacementConfig
from distserve.core import SamplingParams
from distserve.runtime.instance import Role
from distserve.sim.serving_path import ServingPath
from tests.e2e.test_emulated import assert_all_blocks_free, emulated


def window(rate: float, plen: tuple[int, int], olen: tuple[int, int], n: int) -> LiveWindow:
    """A live window as if `n` requests had arrived at `rate` (Poisson) and finished."""
    rng, live, now = random.Random(0), LiveWindow(600.0), time.monotonic()
    t = now - n / rate
    for _ in range(n):
        t += rng.expovariate(rate)
        ids = tuple(rng.randrange(100, 30000) for _ in range(rng.randint(*plen)))
        live.on_finished(Finished(t, ids, rng.randint(*olen), 0.1, 0.01), now)
    return live


def test_layouts_of_n_instances() -> None:
    assert layouts(3) == [(0, 0, 3, 0), (1, 2, 0, 0), (2, 1, 0, 0)]
    assert layouts(2, chunked=True) == [(0, 0, 2, 0), (0, 0, 0, 2), (1, 1, 0, 0)]


def test_the_layout_follows_the_traffic() -> None:
    async def run() -> None:
        c = emulated(PlacementConfig(mode="colocated", num_instances=2), tokenizer="bytes")
        await c.start()
        made: list[Adaptive] = []  # their re-planning processes end with the test
        try:
            # long prompts, a tight TPOT: one prefill + one decode instance predicts better
            c.live = window(4.0, (1500, 2000), (50, 150), 200)
            summ = Adaptive(c, AdaptiveConfig("a100", 1.0, 0.05, dwell=0.0))
            made.append(summ)
            assert await summ.step(time.monotonic()) == (1, 1, 0, 0)
            assert summ.last[(1, 1, 0, 0)] > summ.last[(0, 0, 2, 0)] + 0.05
            assert sorted(i.role.value for i in c.instances) == ["decode", "prefill"]
            # short prompts at a high rate, a tight TTFT: colocated with chunked prefill
            # predicts better; with a dwell the better layout is watched first, then
            # flipped to (each instance turns colocated, then chunked in place)
            c.live = window(60.0, (50, 200), (20, 60), 300)
            code = Adaptive(c, AdaptiveConfig("a100", 0.1, 0.1, dwell=30.0))
            made.append(code)
            now = time.monotonic()
            assert await code.step(now) is None and code.candidate == (0, 0, 0, 2)
            assert {i.role for i in c.instances} == {Role.PREFILL, Role.DECODE}
            assert await code.step(now + 31.0) == (0, 0, 0, 2)
            assert [i.role for i in c.instances] == [Role.COLOCATED] * 2
            assert await code.step(now + 62.0) is None  # already there: no flip back
            assert [code.kind(i) for i in c.instances] == ["chunked"] * 2
            assert sorted((f.old, f.new) for f in c.flips.done[2:]) == [
                ("colocated", "chunked"), ("colocated", "chunked"),
                ("decode", "colocated"), ("prefill", "colocated"),
            ]  # fmt: skip
            params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
            out = [o async for o in c.stream(c.submit("served after the flips", params))][-1]
            assert len(out.token_ids) == 8
            assert_all_blocks_free(c)
        finally:
            await c.stop()
            for a in made:
                a.close()

    asyncio.run(run())


def test_replans_run_in_a_process_of_their_own_on_the_measured_step_overhead() -> None:
    """A re-plan's simulations run outside the controller's process (in a thread they held
    the interpreter's lock from the step loops), on the step overhead the instances
    measured over their back-to-back steps, or the one configured; its predictions are
    those of the simulator run here on the same window and overhead."""

    async def run() -> None:
        c = emulated(PlacementConfig(mode="colocated", num_instances=2), tokenizer="bytes")
        await c.start()
        measured = Adaptive(c, AdaptiveConfig("a100", 1.0, 0.05))
        fixed = Adaptive(c, AdaptiveConfig("a100", 1.0, 0.05, step_overhead=0.004))
        try:
            params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0)

            async def served(k: int) -> int:
                return len([o async for o in c.stream(c.submit(f"request {k}", params))])

            assert all(await asyncio.gather(*(served(k) for k in range(6))))
            stats = [i.stats for i in c.instances]
            steps = sum(s.back_to_back for s in stats)
            assert steps > 0  # six requests on two instances: steps ran back to back
            mean = sum(s.beyond_model_seconds for s in stats) / steps
            assert 0 < mean < 0.05  # the control plane's share of an emulated step
            c.live = window(4.0, (1500, 2000), (50, 150), 60)
            now = time.monotonic()
            for a, overhead in ((measured, mean), (fixed, 0.004)):
                await a.step(now)
                assert a.step_overhead == pytest.approx(overhead)
                pool = a._pool
                assert pool is not None
                assert os.getpid() not in [p.pid for p in pool._processes.values()]
                info = c.instances[0].info
                assert info is not None
                here = predict(
                    c.live.workload(now, a.config.max_requests), a.profile, info.num_blocks,
                    1.0, 0.05, 2, a.config.chunk, a.config.load,
                    ServingPath(step_overhead=overhead),
                )  # fmt: skip
                assert a.last == here
            # no back-to-back steps since: the measured estimate stays
            await measured.step(now)
            assert measured.step_overhead == pytest.approx(mean)
            # the re-planning process killed: that re-plan is skipped, a new process takes
            # the next one
            pool = measured._pool
            assert pool is not None
            for p in list(pool._processes.values()):
                os.kill(p.pid, signal.SIGKILL)
            before = measured.replans
            assert await measured.step(now) is None and measured._pool is None
            await measured.step(now)
            assert measured.replans == before + 1 and measured._pool is not None
        finally:
            await c.stop()
            measured.close()
            fixed.close()

    asyncio.run(run())
