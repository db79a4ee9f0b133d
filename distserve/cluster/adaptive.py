"""Adaptive disaggregation: every interval, replay the live window's requests
(cluster/live.py) in the simulator on every layout of the instances that exist (all
colocated, all colocated with chunked prefill, or k prefill + n-k decode) with the
deployment's profile, and flip roles (cluster/flip.py; chunked prefill on or off is
switched in place) to the best one, but only when its predicted SLO attainment beats the
current layout's by a margin and has done so for a dwell time (hysteresis: a workload on
the edge does not flip back and forth).

The simulator runs in a process of its own, at a lower priority: a re-plan simulates
for a second or more of CPU (a window of a few hundred requests, a few layouts), which in
a thread of the controller's process held the interpreter's lock from the step loops
(`benchmarks/replan_interference.py`: two emulated chunked instances at 15 req/s met both
targets for 0.989 of requests alone, 0.876-0.901 with re-plans in a thread every 2 s,
0.983-0.986 with them in a process). Its predictions take the steps' time
outside the model into account: `AdaptiveConfig.step_overhead`, or the mean the instances
measured over their back-to-back steps since the last re-plan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from distserve.runtime.instance import Role
from distserve.sim.replan import (
    AdaptiveConfig,
    Hysteresis,
    Layout,
    chunked_scheduler,
    kind_of,
    layout_of,
    layouts,
    next_flip,
    pick_profile,
    placement_of,
    predict,
    role_of,
)
from distserve.sim.serving_path import ServingPath

if TYPE_CHECKING:
    from distserve.cluster.controller import Controller
    from distserve.runtime.instance import Instance

__all__ = ["Adaptive", "AdaptiveConfig", "Layout", "layouts", "placement_of", "predict"]

log = logging.getLogger(__name__)


class Adaptive:
    """The re-planning loop of one controller."""

    def __init__(self, controller: Controller, config: AdaptiveConfig) -> None:
        from distserve.sim.profile import load_profiles

        self.controller, self.config = controller, config
        self.profile = pick_profile(load_profiles(config.profile), controller.engine_config.model)
        """The profile of the served model at tp1 pp1 (a file's first one otherwise)."""
        self.hysteresis = Hysteresis(config.margin, config.dwell)
        """The switch rule (sim/replan.py), the simulator's too."""
        self.last: dict[Layout, float] = {}
        """The latest prediction per layout (for /metrics and the logs)."""
        self.replans = 0
        self.step_overhead = config.step_overhead or 0.0
        """Seconds outside the model a step, as the latest re-plan predicted with."""
        self._counted = (0, 0.0)
        """The instances' (back-to-back steps, beyond-model seconds) at the last re-plan."""
        self._pool: ProcessPoolExecutor | None = None
        self._in_thread = False
        """The re-planning process could not start: re-plans run in a thread instead."""
        self._worked = False
        """A re-plan has run in a re-planning process."""

    @property
    def candidate(self) -> Layout | None:
        """The better layout being watched through its dwell time, if any."""
        return self.hysteresis.candidate

    def current(self) -> Layout | None:
        """The layout now, or None while instances are down or flipping."""
        insts = self.controller.instances
        if any(not i.alive or i.draining for i in insts):
            return None
        return layout_of([self.kind(i) for i in insts])

    @staticmethod
    def kind(inst: Instance) -> str:
        """What a layout counts `inst` as ('chunked': colocated with chunked prefill)."""
        return kind_of(inst.role, inst.scheduler.config.chunked_prefill)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval)
            try:
                await self.step(time.monotonic())
            except Exception:  # a failed re-plan must not end the loop
                log.exception("adaptive re-plan failed")

    async def step(self, now: float) -> Layout | None:
        """One re-plan; returns the layout flipped to, if any."""
        cfg, current = self.config, self.current()
        workload = self.controller.live.workload(now, cfg.max_requests)
        if current is None or len(workload) < cfg.min_requests:
            return None
        info = self.controller.instances[0].info
        blocks = info.num_blocks if info is not None else 0
        n = len(self.controller.instances)
        self.step_overhead = self._overhead()
        args = (workload, self.profile, blocks, cfg.ttft_slo, cfg.tpot_slo, n, cfg.chunk,
                cfg.load, ServingPath(step_overhead=self.step_overhead))  # fmt: skip
        if self._pool is None and not self._in_thread:
            self._pool = _replan_process()
        try:  # (a pool of None: the loop's default thread pool)
            self.last = await asyncio.get_running_loop().run_in_executor(self._pool, predict, *args)
        except BrokenProcessPool:
            self.close()
            if self._worked:  # it died (killed, out of memory): a new one next time
                log.error("the re-planning process died; a new one takes the next re-plan")
                return None
            # its start failed: as any process pool's does when the main module starts
            # work at import (guard it with `if __name__ == "__main__":`)
            log.error(
                "the re-planning process failed to start; re-plans run in a thread of this "
                "process from now on, where they slow its step loops (is the main module's "
                "work guarded by `if __name__ == '__main__':`?)"
            )
            self._in_thread = True
            self.last = await asyncio.to_thread(predict, *args)
        self._worked = self._worked or self._pool is not None
        self.replans += 1
        watched = self.hysteresis.candidate
        best = self.hysteresis.decide(self.last, current, now)
        if best is None:
            if self.hysteresis.candidate not in (None, watched):
                new = self.hysteresis.candidate
                log.warning(
                    "layout %s predicts %.2f vs %.2f now: watching",
                    new, self.last[new], self.last.get(current, 0.0),
                )  # fmt: skip
            return None
        await self.apply(best)
        return best

    def _overhead(self) -> float:
        """The configured step overhead, else the instances' measured mean since the last
        re-plan (the last estimate while none of their steps ran back to back)."""
        if self.config.step_overhead is not None:
            return self.config.step_overhead
        stats = [i.stats for i in self.controller.instances]
        steps = sum(s.back_to_back for s in stats)
        seconds = sum(s.beyond_model_seconds for s in stats)
        new_steps, new_seconds = steps - self._counted[0], seconds - self._counted[1]
        self._counted = (steps, seconds)
        if new_steps <= 0:
            return self.step_overhead
        return max(0.0, new_seconds / new_steps)

    def close(self) -> None:
        """End the re-planning process (a re-plan under way with it)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # 3.11's pool has no public way to end a busy worker: a re-plan may run for seconds
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()

    async def apply(self, target: Layout) -> None:
        """Flip instances one at a time until the roles match `target`, each flip one
        the controller accepts (a role is never left empty on the way): the order is
        sim/replan.py's `next_flip`, the simulator's too. A colocated instance turns
        chunked or back in place; another bound for 'chunked' turns colocated first."""
        flips, insts = self.controller.flips, self.controller.instances

        def allowed(i: int, kind: str) -> bool:
            role = Role(role_of(kind))
            if insts[i].role == role:  # chunked prefill on or off: always, when live
                return insts[i].alive and not insts[i].draining
            try:
                flips.check(insts[i], role)
            except ValueError:
                return False
            return True

        for _ in range(3 * len(insts)):
            step = next_flip([self.kind(i) for i in insts], target, allowed)
            if step is None:
                return
            inst, kind = insts[step[0]], step[1]
            if inst.role != Role(role_of(kind)):
                await flips.flip(inst, Role(role_of(kind)))
                continue
            base = self.controller.scheduler_config(Role.COLOCATED)
            flips.rechunk(
                inst, chunked_scheduler(base, self.config.chunk) if kind == "chunked" else base
            )


def _replan_process() -> ProcessPoolExecutor:
    """One process for re-plans, started from a clean server process (a fork of this one,
    which holds threads and a running event loop, is not safe), at a lower priority than
    the instances' work."""
    return ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("forkserver"), initializer=_nice
    )


def _nice() -> None:
    with contextlib.suppress(OSError):
        os.nice(10)
