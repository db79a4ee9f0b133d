"""Faults: a worker that dies (or hangs) loses its KV cache but no request. The request
table holds every request's state, so each request of the dead instance is put back where
it can continue: re-migrated if a prefill worker still holds its KV, else recomputed from
its prompt and the tokens already streamed (the client sees neither a repeat nor a gap).
The instance is then restarted with the same role and cores."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from distserve.cluster.request_table import RequestState, RequestTable
from distserve.core import Request
from distserve.runtime.instance import Instance

log = logging.getLogger(__name__)


class Recovery:
    """Watches workers, rescues the requests of a failed instance, restarts it."""

    def __init__(
        self,
        table: RequestTable,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        replace: Callable[[Instance], Awaitable[Instance]],
        fail: Callable[[RequestState, str], None],
        ping_interval: float = 1.0,
        ping_timeout: float = 10.0,
        orphan_timeout: float = 300.0,
        restart: bool = True,
    ) -> None:
        self.table = table
        self.spawn = spawn
        """Runs a background task that the controller owns (cancelled on stop)."""
        self.replace = replace
        """Starts a new worker for a dead instance (same name, role and cores) and returns
        its instance, connected to its peers but not yet started; raises if it cannot."""
        self.fail = fail
        """Ends a request with an error its client sees."""
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.orphan_timeout = orphan_timeout
        """Seconds a request may wait for some instance able to take it, then it fails."""
        self.restart_enabled = restart
        self.failures = 0
        self.restarts = 0

    # ---- detection -------------------------------------------------------------------
    async def watch(self) -> None:
        """Ping every live worker; a dead or unresponsive one is failed within seconds even
        while its instance is idle (a busy one fails on its next call)."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for inst in [i for i in self.table.instances if i.alive]:
                try:
                    await asyncio.wait_for(inst.executor.ping(), self.ping_timeout)
                except Exception as e:  # dead actor, or no answer in time
                    inst.fail(e)
            self._expire_orphans()

    # ---- rescue ------------------------------------------------------------------------
    def on_failure(self, dead: Instance, error: BaseException) -> None:
        log.error("instance %s failed: %s; rescuing its requests", dead.name, error)
        self.failures += 1
        table = self.table
        for state in list(table.requests.values()):
            if state.migrating:
                continue  # the transfer's own ending decides (cluster/migration.py)
            if state.owner is dead:
                table.resubmit(state, self._latest(state))
            elif state.decode is dead:  # queued for a dead decode: the prefill still has the KV
                state.decode = None
                table.awaiting.append((state, state.owner.scheduler.requests[state.request_id]))
        table.dispatch()
        if self.restart_enabled:
            self.spawn(self._restart(dead))

    def _latest(self, state: RequestState) -> Request:
        """The request as far as it got: the decode copy if any, else the owner's."""
        for inst in (state.decode, state.owner):
            if inst is not None:
                req = inst.scheduler.requests.get(state.request_id)
                if req is not None:
                    return req
        raise KeyError(state.request_id)

    def _expire_orphans(self) -> None:
        now = time.monotonic()
        keep = []
        for since, state, req in self.table.orphans:
            if now - since > self.orphan_timeout and not state.aborted:
                self.fail(
                    state, f"no instance could take the request for {self.orphan_timeout:.0f} s"
                )
            elif not state.aborted:
                keep.append((since, state, req))
        self.table.orphans = keep

    # ---- restart -----------------------------------------------------------------------
    async def _restart(self, dead: Instance) -> None:
        await dead.stop()
        try:
            fresh = await self.replace(dead)
        except Exception:
            log.exception(
                "restart of %s failed; its role continues with the other instances", dead.name
            )
            return
        instances = self.table.instances
        instances[instances.index(dead)] = fresh
        fresh.start()
        self.restarts += 1
        log.warning("instance %s restarted (pid %s)", fresh.name, fresh.pid)
        self.table.adopt_orphans()
        self.table.dispatch()
