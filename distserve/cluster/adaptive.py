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
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distserve.config import PlacementConfig
from distserve.runtime.instance import Role

if TYPE_CHECKING:
    from distserve.cluster.controller import Controller
    from distserve.sim.profile import Profile
    from distserve.workload.spec import Workload

log = logging.getLogger(__name__)

Layout = tuple[int, int, int]
"""(prefill, decode, colocated) instance counts."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """When and how the layout follows the traffic (serve --adaptive)."""

    profile: str = field(metadata={"help": "latency profile JSON of this deployment's instances"})
    ttft_slo: float = field(metadata={"help": "TTFT target (s) the layouts are compared on"})
    tpot_slo: float = field(metadata={"help": "TPOT target (s) the layouts are compared on"})
    interval: float = field(default=20.0, metadata={"help": "seconds between re-plans"})
    margin: float = field(
        default=0.05, metadata={"help": "attainment gain a new layout must predict (0.05 = 5 pts)"}
    )
    dwell: float = field(
        default=30.0, metadata={"help": "seconds a better layout must stay best before a flip"}
    )
    min_requests: int = field(
        default=20, metadata={"help": "finished requests the window needs before a re-plan"}
    )
    max_requests: int = field(
        default=400, metadata={"help": "the latest finished requests a re-plan replays, at most"}
    )

    def __post_init__(self) -> None:
        for name in ("ttft_slo", "tpot_slo", "interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.margin < 0 or self.dwell < 0 or self.min_requests < 1:
            raise ValueError("margin and dwell must be >= 0, min_requests >= 1")


def layouts(n: int) -> list[Layout]:
    """Every layout of n instances: all colocated, or k prefill + n-k decode."""
    return [(0, 0, n)] + [(k, n - k, 0) for k in range(1, n)]


def placement_of(layout: Layout) -> PlacementConfig:
    p, d, c = layout
    if c:
        return PlacementConfig(mode="colocated", num_instances=c)
    return PlacementConfig(mode="disagg", num_prefill=p, num_decode=d)


def predict(
    workload: Workload, profile: Profile, num_blocks: int, ttft: float, tpot: float, n: int
) -> dict[Layout, float]:
    """Predicted attainment of both targets for each layout of n instances."""
    from distserve.sim.run import SimOptions, sim_config, simulate

    opts = SimOptions(num_blocks=num_blocks)
    out = {}
    for layout in layouts(n):
        summary, _ = simulate(
            sim_config(placement_of(layout), profile, None, opts), workload, ttft, tpot
        )
        out[layout] = summary["attainment"]["both"]
    return out


class Adaptive:
    """The re-planning loop of one controller."""

    def __init__(self, controller: Controller, config: AdaptiveConfig) -> None:
        from distserve.sim.profile import load_profiles

        self.controller, self.config = controller, config
        profiles = load_profiles(config.profile)
        name = controller.engine_config.model
        mine = [p for p in profiles if p.model == name and p.tp == p.pp == 1]
        self.profile = (mine or profiles)[0]
        """The profile of the served model at tp1 pp1 (a file's first one otherwise)."""
        self.candidate: Layout | None = None
        self.since = 0.0
        self.last: dict[Layout, float] = {}
        """The latest prediction per layout (for /metrics and the logs)."""
        self.replans = 0

    def current(self) -> Layout | None:
        """The layout now, or None while instances are down or flipping."""
        insts = self.controller.instances
        if any(not i.alive or i.draining for i in insts):
            return None
        roles = Counter(i.role for i in insts)
        return roles[Role.PREFILL], roles[Role.DECODE], roles[Role.COLOCATED]

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
        best = max(self.last, key=lambda lay: (self.last[lay], lay == current))
        if best == current or self.last[best] < self.last.get(current, 0.0) + cfg.margin:
            self.candidate = None
            return None
        if best != self.candidate:
            self.candidate, self.since = best, now
            log.warning(
                "layout %s predicts %.2f vs %.2f now: watching",
                best,
                self.last[best],
                self.last.get(current, 0.0),
            )
        if now - self.since < cfg.dwell:
            return None
        await self.apply(best)
        self.candidate = None
        return best

    async def apply(self, target: Layout) -> None:
        """Flip instances one at a time until the roles match `target`, each flip one
        the controller accepts (a role is never left empty on the way)."""
        want = {Role.PREFILL: target[0], Role.DECODE: target[1], Role.COLOCATED: target[2]}
        for _ in range(2 * len(self.controller.instances)):
            have = Counter(i.role for i in self.controller.instances)
            if all(have[r] == want[r] for r in want):
                return
            surplus = [i for i in self.controller.instances if have[i.role] > want[i.role]]
            needed = [r for r in want if have[r] < want[r]]
            for inst in surplus:
                for role in needed:
                    try:
                        self.controller.flips.check(inst, role)
                    except ValueError:
                        continue
                    await self.controller.flips.flip(inst, role)
                    break
                else:
                    continue
                break
            else:
                raise RuntimeError(f"no flip leads from {dict(have)} towards {target}")
