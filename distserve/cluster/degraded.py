"""Degraded modes: when a whole role has been down for `after` seconds (every instance of
it dead, its restarts failing), the other role's instances serve requests end to end
(colocated) instead of letting them wait; when the role is back, they return to their
roles. No request is lost on the way: a forced flip (cluster/flip.py) queues what a
prefill instance held again from its prompt and the tokens already streamed."""

from __future__ import annotations

import asyncio
import logging
import time

from distserve.cluster.flip import Flips
from distserve.cluster.request_table import RequestTable
from distserve.runtime.instance import Instance, Role

log = logging.getLogger(__name__)


class Degraded:
    """Watches the roles of a disaggregated deployment and covers for a missing one."""

    def __init__(self, table: RequestTable, flips: Flips, after: float = 10.0) -> None:
        self.table, self.flips, self.after = table, flips, after
        self.covering: dict[str, Role] = {}
        """Instance name -> the role it left to serve end to end."""
        self._down_since: dict[Role, float] = {}

    @property
    def reason(self) -> str | None:
        """Why the deployment is degraded now (for /health), or None."""
        if not self.covering:
            return None
        missing = {Role.PREFILL: Role.DECODE, Role.DECODE: Role.PREFILL}
        gone = sorted({missing[r].value for r in self.covering.values()})
        names = ", ".join(sorted(self.covering))
        return f"no live {' or '.join(gone)} instance: {names} serving requests end to end"

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(time.monotonic())
            except Exception:  # a failed flip is retried on the next look
                log.exception("degraded-mode check failed")

    def _role_down(self, role: Role, now: float) -> bool:
        """Whether every instance of `role` has been dead for `after` s (False if the
        deployment has none of that role at all)."""
        members = [i for i in self.table.instances if i.role == role]
        if not members or any(i.alive for i in members):
            self._down_since.pop(role, None)
            return False
        since = self._down_since.setdefault(role, now)
        return now - since >= self.after

    async def check(self, now: float) -> None:
        for lost, cover in ((Role.DECODE, Role.PREFILL), (Role.PREFILL, Role.DECODE)):
            if self._role_down(lost, now):
                for inst in [i for i in self.table.instances if i.alive and i.role == cover]:
                    await self._cover(inst, cover)
        await self._restore()

    async def _cover(self, inst: Instance, role: Role) -> None:
        if inst.draining or inst.name in self.covering:
            return
        lost, name = ("decode" if role == Role.PREFILL else "prefill"), inst.name
        log.error("no live %s instance for %.0f s: %s serves end to end", lost, self.after, name)
        # a prefill instance holds prefilled requests no decode instance will take: it
        # queues them again rather than wait for them; a decode instance finishes its own
        await self.flips.flip(inst, Role.COLOCATED, force=role == Role.PREFILL)
        self.covering[inst.name] = role
        if role == Role.PREFILL:  # resumes waiting for a decode instance: computed again
            awaiting = self.table.awaiting
            resumes = [(s, r) for s, r in awaiting if s.from_store]
            self.table.awaiting = type(awaiting)(x for x in awaiting if not x[0].from_store)
            for state, req in resumes:
                state.from_store = False
                if not state.aborted:
                    self.table.resubmit(state, req)

    async def _restore(self) -> None:
        """Covering instances go back once their missing role has a live instance again."""
        for name, role in list(self.covering.items()):
            missing = Role.DECODE if role == Role.PREFILL else Role.PREFILL
            if not any(i.alive and i.role == missing for i in self.table.instances):
                continue
            inst = next((i for i in self.table.instances if i.name == name), None)
            if inst is None or not inst.alive or inst.draining:
                continue  # died meanwhile: its replacement (colocated too) goes back
            if inst.role != Role.COLOCATED:
                del self.covering[name]
                continue
            await self.flips.flip(inst, role)
            del self.covering[name]
            log.warning("%s is back to %s", name, role.value)
