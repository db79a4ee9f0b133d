"""Pull-based KV migration, driven by the controller: prefilled requests are handed to
decode instances that can queue them; when a decode instance admits one (blocks
allocated), its KV is pulled from the prefill worker; only after the copy is confirmed
does the prefill side free its blocks. Failures on either side are rolled back on the
side that survives."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from distserve.core import DecodeScheduler, PrefillScheduler, Request
from distserve.core.routing import pick_decode
from distserve.runtime.instance import Instance
from distserve.runtime.transport import transfer_blocks

if TYPE_CHECKING:
    from distserve.cluster.controller import Controller, RequestState

log = logging.getLogger(__name__)


def handoff_copy(req: Request) -> Request:
    """The decode side's own copy of a prefilled request (the prefill side keeps its
    object until it releases the blocks)."""
    return dataclasses.replace(
        req,
        output_token_ids=list(req.output_token_ids),
        output_logprobs=list(req.output_logprobs),
        timestamps=dict(req.timestamps),
    )


class Migrations:
    """The controller's migration driver."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def dispatch(self) -> None:
        """Hand prefilled requests, oldest first, to decode instances that can queue them."""
        c = self.c
        while c.awaiting:
            state, req = c.awaiting[0]
            held = state.owner.alive and state.owner.scheduler.requests.get(req.request_id) is req
            if state.aborted or req.finished or not held:
                c.awaiting.popleft()  # gone, or rescued elsewhere
                continue
            dec = pick_decode(c.decode_instances)
            if dec is None:
                return
            c.awaiting.popleft()
            assert isinstance(dec.scheduler, DecodeScheduler)
            dec.scheduler.add_migrating(handoff_copy(req))
            state.decode = dec
            dec.wake()

    def on_admitted(self, dec: Instance, requests: list[Request]) -> None:
        c = self.c
        for req in requests:
            state = c.requests.get(req.request_id)
            if state is None or state.decode is not dec:  # aborted or rescued meanwhile
                dec.scheduler.abort_request(req.request_id, time.monotonic())
                continue
            state.migrating = True
            c.spawn(self.migrate(state, dec, req))

    async def migrate(self, state: RequestState, dec: Instance, req: Request) -> None:
        """Pull the KV of `req` from its prefill instance into `dec`."""
        c, src, rid = self.c, state.owner, req.request_id
        assert isinstance(dec.scheduler, DecodeScheduler)
        assert isinstance(src.scheduler, PrefillScheduler)
        src_blocks = src.scheduler.blocks.block_table(rid)
        dst_blocks = dec.scheduler.blocks.block_table(rid)[: len(src_blocks)]
        transfer = transfer_blocks(src.executor, src_blocks, dec.executor, dst_blocks)
        try:
            stats = await asyncio.wait_for(transfer, c.migration_timeout)
            ok = True
        except Exception:  # failed, timed out, or a peer died
            log.warning(
                "migration of %s from %s to %s failed", rid, src.name, dec.name, exc_info=True
            )
            ok = False
        state.migrating = False
        now = time.monotonic()
        if state.aborted:
            c.release_everywhere(state)
            return
        if ok and dec.alive:
            dec.scheduler.finish_migration(rid, now)
            if src.alive:
                src.scheduler.release_migrated(rid, now)
                src.wake()
            state.owner, state.decode = dec, None
            c.migrations[stats.transport] += 1
            if c.observer:
                c.observer.on_migration(stats)
            dec.wake()
        elif src.alive:  # the prefill side still holds the KV: try again
            if dec.alive:
                dec.scheduler.fail_migration(rid, now)
                dec.wake()
            else:
                state.decode = None
                c.awaiting.append((state, src.scheduler.requests[rid]))
        else:  # the KV is gone with the prefill worker: compute it again
            if dec.alive:
                dec.scheduler.abort_request(rid, now)
                dec.wake()
            c.recovery.resubmit(state, req)
        self.dispatch()
