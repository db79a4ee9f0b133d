"""Adaptive disaggregation: every interval, replay the live window's requests
(cluster/live.py) in the simulator on every layout of the instances that exist (all
colocated, or k prefill + n-k decode) with the deployment's profile, and flip roles
(cluster/flip.py) to the best one, but only when its predicted SLO attainment beats the
current layout's by a margin and has done so for a dwell time (hysteresis: a workload on
the edge does not flip back and forth).

The simulator runs in a thread; a window of a few hundred requests takes well under a
second per layout on this CPU."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from distserve.runtime.instance import Role
from distserve.sim.replan import (
    AdaptiveConfig,
    Hysteresis,
    Layout,
    layout_of,
    layouts,
    next_flip,
    pick_profile,
    placement_of,
    predict,
)

if TYPE_CHECKING:
    from distserve.cluster.controller import Controller

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

    @property
    def candidate(self) -> Layout | None:
        """The better layout being watched through its dwell time, if any."""
        return self.hysteresis.candidate

    def current(self) -> Layout | None:
        """The layout now, or None while instances are down or flipping."""
        insts = self.controller.instances
        if any(not i.alive or i.draining for i in insts):
            return None
        return layout_of([i.role for i in insts])

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
        self.last = await asyncio.to_thread(
            predict, workload, self.profile, blocks, cfg.ttft_slo, cfg.tpot_slo, n
        )
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

    async def apply(self, target: Layout) -> None:
        """Flip instances one at a time until the roles match `target`, each flip one
        the controller accepts (a role is never left empty on the way): the order is
        sim/replan.py's `next_flip`, the simulator's too."""
        flips = self.controller.flips

        def allowed(i: int, role: str) -> bool:
            try:
                flips.check(self.controller.instances[i], Role(role))
            except ValueError:
                return False
            return True

        for _ in range(2 * len(self.controller.instances)):
            step = next_flip([i.role for i in self.controller.instances], target, allowed)
            if step is None:
                return
            await flips.flip(self.controller.instances[step[0]], Role(step[1]))
