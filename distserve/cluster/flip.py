"""Role flipping: an instance turns prefill <-> decode <-> colocated without reloading its
model. It stops admitting, hands its queued work to instances of its old role, lets what
it is computing finish (prefilled requests leave through the normal migration pull),
then takes a fresh scheduler of the new role over the same worker and admits again.

Nothing is dropped or computed twice: a queued prompt moves before any of it ran, a
request waiting for migration into a draining decode instance is handed to another, and
a running one is never interrupted. A flip that would leave a role with no instance to
take its requests is refused.

Turning chunked prefill on or off on a colocated instance (`rechunk`, adaptive
re-planning's 'chunked' layouts) is no flip of its role: its scheduler switches policy
in place between steps (ColocatedScheduler.reconfigure), nothing drains or moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from distserve.cluster.request_table import RequestTable
from distserve.core import ColocatedScheduler, DecodeScheduler, Scheduler, SchedulerConfig
from distserve.core.routing import pick_prefill
from distserve.runtime.instance import Instance, Role
from distserve.sim.replan import flip_refusal, kind_of

log = logging.getLogger(__name__)


@dataclass
class FlipRecord:
    """One flip, for /metrics and the step trace's readers."""

    instance: str
    old: str
    new: str
    started: float
    seconds: float = 0.0
    moved: int = 0
    """Queued requests handed to other instances."""


@dataclass
class Flips:
    """The controller's flip driver."""

    table: RequestTable
    new_scheduler: Callable[[Instance, Role], Scheduler]
    done: list[FlipRecord] = field(default_factory=list)

    def check(self, inst: Instance, role: Role, force: bool = False) -> None:
        """Raise ValueError for a flip that cannot be made: the instance is not live, is
        flipping, has the role already, or the flip would leave prompts with no instance
        to take them, or (unless `force`) prefilled requests with no decode instance."""
        if inst not in self.table.instances or not inst.alive:
            raise ValueError(f"instance {inst.name} is not a live instance")
        if inst.draining:
            raise ValueError(f"instance {inst.name} is already flipping")
        if inst.role == role:
            raise ValueError(f"instance {inst.name} is already {role.value}")
        others = [i.role for i in self.table.instances if i is not inst and i.alive]
        why = flip_refusal(others, role, force)  # the simulator's rule too (sim/replan.py)
        if why is not None:
            raise ValueError(f"flipping {inst.name} to {role.value} {why}")

    async def flip(
        self, inst: Instance, role: Role, force: bool = False, poll: float = 0.02
    ) -> FlipRecord:
        """Drain `inst`, then give it a scheduler of `role`; returns when it admits again.
        With `force` (a degraded mode: cluster/degraded.py) it does not wait for its
        requests to finish: once its step and its outgoing migrations are over, each
        request it holds is queued again from its prompt and the tokens streamed so far
        (on this instance, in its new role, or another), as recovery does for a dead one."""
        self.check(inst, role, force)
        rec = FlipRecord(inst.name, inst.role.value, role.value, time.monotonic())
        inst.draining = True
        held = []
        try:
            rec.moved = self._hand_over(inst)
            while inst.alive and not self._drained(inst, force):
                await asyncio.sleep(poll)
                rec.moved += self._hand_over(inst)
            inst.paused = True
            while inst.alive and inst.stepping:  # the plan in flight is the old scheduler's
                await asyncio.sleep(poll)
            if not inst.alive:
                raise RuntimeError(f"{inst.name} died while flipping")
            if force:
                held = [
                    (st, inst.scheduler.requests[rid])
                    for rid, st in list(self.table.requests.items())
                    if st.owner is inst and rid in inst.scheduler.requests
                ]
            inst.scheduler = self.new_scheduler(inst, role)
            inst.role = role
        finally:
            inst.draining = inst.paused = False
        for state, req in held:
            self.table.resubmit(state, req)
        rec.moved += len(held)
        inst.wake()
        self.table.adopt_orphans()
        self.table.dispatch()
        rec.seconds = time.monotonic() - rec.started
        self.done.append(rec)
        log.warning(
            "flipped %s from %s to %s in %.2f s (%d requests moved)",
            inst.name, rec.old, rec.new, rec.seconds, rec.moved,
        )  # fmt: skip
        return rec

    def rechunk(self, inst: Instance, config: SchedulerConfig) -> FlipRecord:
        """Give a live colocated instance's scheduler `config`: chunked prefill on or off
        (and its token budget), in place and at once. A step in flight is applied as it
        was planned; a prompt partly computed in chunks finishes whole after chunking
        goes off; no request moves, none is computed twice."""
        sched = inst.scheduler
        if inst not in self.table.instances or not inst.alive or inst.draining:
            raise ValueError(f"instance {inst.name} is not a live instance")
        if not isinstance(sched, ColocatedScheduler):
            raise ValueError(f"instance {inst.name} is {inst.role.value}, not colocated")
        old = kind_of(inst.role, sched.config.chunked_prefill)
        sched.reconfigure(config)
        rec = FlipRecord(
            inst.name, old, kind_of(inst.role, config.chunked_prefill), time.monotonic()
        )
        inst.wake()
        self.done.append(rec)
        log.warning("switched %s from %s to %s", inst.name, rec.old, rec.new)
        return rec

    def _drained(self, inst: Instance, force: bool) -> bool:
        """Whether `inst` may take its new scheduler now: no request left, or (force) no
        KV transfer of its requests in flight."""
        if not force:
            return not inst.scheduler.has_unfinished()
        return not any(
            st.migrating and (st.owner is inst or st.decode is inst)
            for st in self.table.requests.values()
        )

    def _hand_over(self, inst: Instance) -> int:
        """Move work that has not started on `inst` to other instances of its role."""
        now, moved, table = time.monotonic(), 0, self.table
        sched = inst.scheduler  # routing skips a draining instance (core/routing.py)
        if isinstance(sched, DecodeScheduler):
            for req in list(sched.pending):  # admitted nowhere yet: the prefill side holds its KV
                state = table.requests.get(req.request_id)
                if state is None or state.migrating or state.decode is not inst:
                    continue
                sched.abort_request(req.request_id, now)
                state.decode = None
                table.awaiting.append((state, state.owner.scheduler.requests[req.request_id]))
                moved += 1
            table.dispatch()
            return moved
        if pick_prefill(table.entry_instances) is None:
            return 0  # no other instance takes prompts now: the queue drains here
        for req in list(sched.waiting):
            state = table.requests.get(req.request_id)
            if state is None or state.owner is not inst or req.num_computed_tokens:
                continue  # partly computed (chunked, preempted): it finishes here
            table.resubmit(state, req, preempted=False)
            moved += 1
        return moved
