"""Faults: a worker that dies (or hangs) loses its KV cache but no request. The request
table holds every request's state, so each request of the dead instance is put back where
it can continue: re-migrated if a prefill worker still holds its KV, else recomputed from
its prompt and the tokens already streamed (the client sees neither a repeat nor a gap).
The instance is then restarted with the same role and cores, again and again (with a
capped backoff) until it runs: a second fault during recovery must not end a role. While
a role has no live instance, its requests wait for it, but only `orphan_timeout` seconds.
"""

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
        max_backoff: float = 30.0,
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
        self.max_backoff = max_backoff
        """Longest pause between two tries to restart an instance (1, 2, 4 ... s up to it)."""
        self.failures = 0
        self.restarts = 0
        self.restart_errors: dict[str, str] = {}
        """Instance name -> why its last restart failed, while it is still being retried."""
        self.restart_attempts: dict[str, int] = {}
        """Instance name -> the try under way, while it is being restarted (a try may wait
        up to the start timeout: a lost raylet leaves a new worker pending, not failed)."""
        self._stalled: dict[str, float] = {}
        """Request id -> since when it has been live while no decode instance was."""

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
            self._expire_stalled()

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

    def _expire_stalled(self) -> None:
        """Disaggregated, every live request needs a decode instance for its tokens after
        the first; while none is alive (all restarting), each waits `orphan_timeout` s from
        when it first found the role down, then fails, rather than hang on a role that may
        not come back (a raylet gone, a device lost)."""
        decoders = self.table.decode_instances
        if not decoders or any(i.alive for i in decoders):
            self._stalled.clear()
            return
        now = time.monotonic()
        stalled = {}
        for rid, state in list(self.table.requests.items()):
            since = self._stalled.get(rid, now)
            if state.aborted:
                continue
            if now - since > self.orphan_timeout and not state.migrating:
                self.fail(
                    state,
                    f"waited {self.orphan_timeout:.0f} s for a decode instance; none is alive "
                    "(restarting); try again later",
                )
            else:  # a transfer's own ending (its timeout) comes first
                stalled[rid] = since
        self._stalled = stalled

    # ---- restart -----------------------------------------------------------------------
    async def _restart(self, dead: Instance) -> None:
        """Replace `dead` with a fresh instance, retrying with a capped exponential backoff
        for as long as the controller runs (it cancels this task on stop): a fault during a
        restart (the new worker killed as it loads, the node out of memory) only delays it."""
        await dead.stop()
        delay, attempt = 1.0, 0
        while True:
            attempt += 1
            self.restart_attempts[dead.name] = attempt
            try:
                fresh = await self.replace(dead)
                break
            except Exception as e:  # anything but cancellation: try again
                self.restart_errors[dead.name] = f"{type(e).__name__}: {e}"
                log.error(
                    "restart %d of %s failed (%s: %s); trying again in %.0f s",
                    attempt, dead.name, type(e).__name__, e, delay,
                )  # fmt: skip
                log.debug("restart of %s failed", dead.name, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.max_backoff)
        self.restart_errors.pop(dead.name, None)
        self.restart_attempts.pop(dead.name, None)
        instances = self.table.instances
        instances[instances.index(dead)] = fresh
        fresh.start()
        self.restarts += 1
        log.warning("instance %s restarted (pid %s)", fresh.name, fresh.pid)
        self.table.adopt_orphans()
        self.table.dispatch()
