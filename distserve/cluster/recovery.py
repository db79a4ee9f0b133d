"""Faults: a worker that dies (or hangs) loses its KV cache but no request. The controller
holds every request's state, so each request of the dead instance is put back where it
can continue: re-migrated if a prefill worker still holds its KV, else recomputed from its
prompt and the tokens already streamed (the client sees neither a repeat nor a gap). The
instance is then restarted with the same role and cores."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from distserve.cluster.placement import connect_restarted, restart_worker
from distserve.core import Request
from distserve.core.routing import pick_prefill
from distserve.runtime.instance import Instance, Role

if TYPE_CHECKING:
    from distserve.cluster.controller import Controller, RequestState

log = logging.getLogger(__name__)


class Recovery:
    """Watches workers, rescues the requests of a failed instance, restarts it."""

    def __init__(
        self,
        controller: Controller,
        ping_interval: float = 1.0,
        ping_timeout: float = 10.0,
        orphan_timeout: float = 300.0,
        restart: bool = True,
    ) -> None:
        self.c = controller
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.orphan_timeout = orphan_timeout
        """Seconds a request may wait for some instance able to take it, then it fails."""
        self.restart_enabled = restart
        self.orphans: list[tuple[float, RequestState, Request]] = []
        self.failures = 0
        self.restarts = 0

    # ---- detection -------------------------------------------------------------------
    async def watch(self) -> None:
        """Ping every live worker; a dead or unresponsive one is failed within seconds even
        while its instance is idle (a busy one fails on its next call)."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for inst in [i for i in self.c.instances if i.alive]:
                try:
                    await asyncio.wait_for(inst.executor.ping(), self.ping_timeout)
                except Exception as e:  # dead actor, or no answer in time
                    inst.fail(e)
            self._expire_orphans()

    def on_failure(self, dead: Instance, error: BaseException) -> None:
        log.error("instance %s failed: %s; rescuing its requests", dead.name, error)
        self.failures += 1
        c = self.c
        for state in list(c.requests.values()):
            if state.migrating:
                continue  # the transfer's own ending decides (cluster/migration.py)
            if state.owner is dead:
                self.resubmit(state, self._latest(state))
            elif state.decode is dead:  # queued for a dead decode: the prefill still has the KV
                state.decode = None
                c.awaiting.append((state, state.owner.scheduler.requests[state.request_id]))
        c.migration.dispatch()
        if self.restart_enabled:
            c.spawn(self._restart(dead))

    def _latest(self, state: RequestState) -> Request:
        """The request as far as it got: the decode copy if any, else the owner's."""
        for inst in (state.decode, state.owner):
            if inst is not None:
                req = inst.scheduler.requests.get(state.request_id)
                if req is not None:
                    return req
        raise KeyError(state.request_id)

    # ---- rescue ------------------------------------------------------------------------
    def resubmit(self, state: RequestState, req: Request) -> None:
        """Queue a request again on a live prompt-taking instance, from its prompt plus the
        tokens already produced; its next token continues the stream."""
        now = time.monotonic()
        for inst in (state.owner, state.decode):
            if inst is not None and inst.alive:
                inst.scheduler.abort_request(state.request_id, now)  # drop stale copies
        again = Request(
            req.request_id, list(req.prompt_token_ids), req.sampling_params, req.arrival_time,
            eos_token_id=req.eos_token_id, output_token_ids=list(req.output_token_ids),
            output_logprobs=list(req.output_logprobs), timestamps=dict(req.timestamps),
            num_preemptions=req.num_preemptions + 1,
        )  # fmt: skip
        state.decode, state.migrating = None, False
        target = pick_prefill(self.c.entry_instances)
        if target is None:
            self.orphans.append((now, state, again))
            return
        self._place(state, again, target)

    def _place(self, state: RequestState, req: Request, inst: Instance) -> None:
        state.owner = inst
        inst.scheduler.add_request(req)
        inst.wake()

    def _adopt_orphans(self) -> None:
        waiting, self.orphans = self.orphans, []
        for since, state, req in waiting:
            if state.aborted:
                continue
            target = pick_prefill(self.c.entry_instances)
            if target is None:
                self.orphans.append((since, state, req))
            else:
                self._place(state, req, target)

    def _expire_orphans(self) -> None:
        now = time.monotonic()
        keep = []
        for since, state, req in self.orphans:
            if now - since > self.orphan_timeout and not state.aborted:
                self.c.fail_request(
                    state, f"no instance could take the request for {self.orphan_timeout:.0f} s"
                )
            elif not state.aborted:
                keep.append((since, state, req))
        self.orphans = keep

    # ---- restart -----------------------------------------------------------------------
    async def _restart(self, dead: Instance) -> None:
        c = self.c
        await dead.stop()
        try:
            executor, info = await restart_worker(
                c.engine_config,
                c.placement,
                dead.role.value,
                dead.cores,
                c.use_ray,
                c.start_timeout,
            )
            decoders = [i.executor for i in c.instances if i.alive and i.role == Role.DECODE]
            await connect_restarted(
                executor, info, dead.role.value, decoders, c.transport in ("auto", "shm")
            )
        except Exception:
            log.exception(
                "restart of %s failed; its role continues with the other instances", dead.name
            )
            return
        fresh = c.make_instance(dead.name, dead.role, executor, info, dead.cores)
        c.instances[c.instances.index(dead)] = fresh
        fresh.start()
        self.restarts += 1
        log.warning("instance %s restarted (pid %d)", fresh.name, info.pid)
        self._adopt_orphans()
        c.migration.dispatch()
