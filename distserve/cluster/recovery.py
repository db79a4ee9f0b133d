"""Faults: a worker that dies (or hangs) loses its KV cache but no request. The request
table holds every request's state, so each request of the dead instance is put back where
it can continue: re-migrated if a prefill worker still holds its KV, else recomputed from
its prompt and the tokens already streamed (the client sees neither a repeat nor a gap).
The instance is then restarted with the same role and cores, again and again (with a
capped backoff) until it runs: a second fault during recovery must not end a role. While
a role has no live instance, its requests wait for it, but only `orphan_timeout` seconds.

The cluster itself may go (the server's raylet killed): with a `cluster` link, the watch
sees that within a second and fails every instance at once (Ray would run their actors on
for some 15 s and then declare them all dead), each restart first gets a new cluster
(a fresh local one, or the same joined again: cluster/local_ray.py RayLink), and a try
that is under way when the cluster goes is abandoned at once rather than waiting out the
start timeout for a worker that can never start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from distserve.cluster.request_table import RequestState, RequestTable
from distserve.core import Request
from distserve.core.request import resume_copy
from distserve.runtime.instance import Instance

log = logging.getLogger(__name__)


class ClusterLink(Protocol):
    """What recovery needs of the cluster its workers run on (local_ray.RayLink)."""

    @property
    def closes_lost_workers(self) -> bool:
        """Whether a worker of a lost cluster may still be closed (else it is left)."""
        ...

    async def gone(self, now: bool = False) -> str | None:
        """Why the cluster is gone (every worker with it), or None while it runs; `now`:
        look again at once (a worker has failed)."""
        ...

    async def reconnect(self) -> None:
        """A working cluster again if it was gone (nothing if not); raises if it cannot."""
        ...


class ClusterLost(RuntimeError):
    """The cluster went away while an instance was being restarted on it."""


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
        ping_misses: int = 2,
        orphan_timeout: float = 300.0,
        restart: bool = True,
        max_backoff: float = 30.0,
        cluster: ClusterLink | None = None,
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
        self.ping_misses = ping_misses
        """Pings in a row a worker may leave unanswered (each `ping_timeout` s) before it
        is failed: one slow answer on a machine short of CPU is not a death (a dead
        worker's ping fails at once)."""
        self._missed: dict[str, int] = {}
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
        up to the start timeout, unless the cluster is seen gone: then it ends at once)."""
        self._stalled: dict[str, float] = {}
        """Request id -> since when it has been live while no decode instance was."""
        self.cluster = cluster
        """The Ray cluster the workers run on, if any: watched, and renewed once gone."""
        self._stopping = 0
        """Dead instances whose workers are being stopped (closed) right now."""
        self.resume: Callable[[Instance, RequestState, Request], bool] | None = None
        """Queues a dead decode instance's request to be pulled from the KV store
        (cluster/store_link.py); False: the store lacks it, recompute it."""

    # ---- detection -------------------------------------------------------------------
    async def watch(self) -> None:
        """Ping every live worker; a dead one is failed within seconds even while its
        instance is idle (a busy one fails on its next call), an unresponsive one once it
        has left `ping_misses` pings in a row unanswered."""
        while True:
            await asyncio.sleep(self.ping_interval)
            lost = await self.cluster.gone() if self.cluster is not None else None
            if lost is not None:  # every worker went with it
                for inst in [i for i in self.table.instances if i.alive]:
                    inst.fail(ClusterLost(lost))
            for inst in [i for i in self.table.instances if i.alive]:
                try:  # not wait_for: on 3.11 it swallows a cancel that meets a finished ping
                    async with asyncio.timeout(self.ping_timeout):
                        await inst.executor.ping()
                    self._missed.pop(inst.name, None)
                except TimeoutError as e:  # no answer in time
                    missed = self._missed[inst.name] = self._missed.get(inst.name, 0) + 1
                    if missed >= self.ping_misses:
                        self._missed.pop(inst.name, None)
                        inst.fail(e)
                    else:
                        log.warning(
                            "%s left a ping unanswered for %.0f s (%d of %d before it is "
                            "failed)", inst.name, self.ping_timeout, missed, self.ping_misses,
                        )  # fmt: skip
                except Exception as e:  # a dead actor
                    self._missed.pop(inst.name, None)
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
                req = self._latest(state)
                if self.resume is None or not self.resume(dead, state, req):
                    table.resubmit(state, req)
            elif state.decode is dead and state.from_store:  # its KV is in the store still
                state.decode = None
                table.awaiting.append((state, resume_copy(self._latest(state))))
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
        self._stopping += 1
        try:
            cluster = self.cluster
            lost = await cluster.gone(now=True) if cluster is not None else None
            if lost is None or (cluster is not None and cluster.closes_lost_workers):
                await dead.stop()
        except Exception as e:  # its cluster may be gone with it: nothing left to stop
            log.debug("stopping %s: %s: %s", dead.name, type(e).__name__, e)
        finally:
            self._stopping -= 1
        delay, attempt = 1.0, 0
        while True:
            attempt += 1
            self.restart_attempts[dead.name] = attempt
            try:
                if self.cluster is not None:
                    for _ in range(100):  # a new cluster only once the old handles are closed
                        if not self._stopping:
                            break
                        await asyncio.sleep(0.05)
                    await self.cluster.reconnect()
                fresh = await self._try_replace(dead)
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

    async def _try_replace(self, dead: Instance) -> Instance:
        """`replace(dead)`, abandoned (ClusterLost) as soon as the cluster is seen gone."""
        attempt = asyncio.ensure_future(self.replace(dead))
        try:
            while True:
                done, _ = await asyncio.wait({attempt}, timeout=self.ping_interval)
                if done:
                    return attempt.result()
                lost = await self.cluster.gone() if self.cluster is not None else None
                if lost:
                    raise ClusterLost(lost)
        finally:
            if not attempt.done():  # it closes what it started (placement.replace_worker)
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
