"""Pull-based KV migration, driven by the controller: prefilled requests are handed to
decode instances that can queue them (`RequestTable.dispatch`); when a decode instance
admits one (blocks allocated), its KV is pulled from the prefill worker; only after the
copy is confirmed does the prefill side free its blocks. Failures on either side are
rolled back on the side that survives."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from distserve.cluster.request_table import RequestState, RequestTable
from distserve.core import DecodeScheduler, PrefillScheduler, Request
from distserve.core.kv_store import KVStore
from distserve.core.request import resume_copy
from distserve.runtime.instance import Instance
from distserve.runtime.transport import TransferStats, load_from_store, transfer_blocks

log = logging.getLogger(__name__)


class Migrations:
    """The controller's migration driver: starts a KV pull for each admitted request and
    settles the request table when the pull ends."""

    def __init__(
        self,
        table: RequestTable,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        timeout: float,
        on_migration: Callable[[TransferStats], None] | None = None,
    ) -> None:
        self.store: KVStore | None = None
        """The KV store (set by the controller when it has one): requests of a dead decode
        instance are pulled from it (`state.from_store`)."""
        self.table = table
        self.spawn = spawn
        """Runs a background task that the controller owns (cancelled on stop)."""
        self.timeout = timeout
        """Seconds a transfer may take before it counts as failed."""
        self.on_migration = on_migration
        self.completed: collections.Counter[str] = collections.Counter()
        """Completed migrations per transport used (TransferStats.transport)."""

    def on_admitted(self, dec: Instance, requests: list[Request]) -> None:
        for req in requests:
            state = self.table.requests.get(req.request_id)
            if state is None or state.decode is not dec:  # aborted or rescued meanwhile
                dec.scheduler.abort_request(req.request_id, time.monotonic())
                continue
            state.migrating = True
            self.spawn(self.migrate(state, dec, req))

    async def migrate(self, state: RequestState, dec: Instance, req: Request) -> None:
        """Pull the KV of `req` from its prefill instance into `dec`."""
        if state.from_store:
            await self.resume(state, dec, req)
            return
        table, src, rid = self.table, state.owner, req.request_id
        assert isinstance(dec.scheduler, DecodeScheduler)
        assert isinstance(src.scheduler, PrefillScheduler)
        # Only what the decode side lacks moves: its prefix-cache hits head the table.
        skip = dec.scheduler.num_local_blocks(rid)
        src_blocks = src.scheduler.blocks.block_table(rid)
        dst_blocks = dec.scheduler.blocks.block_table(rid)[skip : len(src_blocks)]
        src_blocks = src_blocks[skip:]
        transfer = transfer_blocks(src.executor, src_blocks, dec.executor, dst_blocks)
        try:
            async with asyncio.timeout(self.timeout):  # wait_for can swallow a cancel (3.11)
                stats = await transfer
            ok = True
        except Exception:  # failed, timed out, or a peer died
            log.warning(
                "migration of %s from %s to %s failed", rid, src.name, dec.name, exc_info=True
            )
            ok = False
        state.migrating = False
        now = time.monotonic()
        if state.aborted:
            table.release_everywhere(state)
            return
        if ok and dec.alive:
            dec.scheduler.finish_migration(rid, now)
            if src.alive:
                src.scheduler.release_migrated(rid, now)
                src.wake()
            state.owner, state.decode = dec, None
            self.completed[stats.transport] += 1
            if self.on_migration:
                self.on_migration(stats)
            dec.wake()
        elif src.alive:  # the prefill side still holds the KV: try again
            if dec.alive:
                dec.scheduler.fail_migration(rid, now)
                dec.wake()
            else:
                state.decode = None
                table.awaiting.append((state, src.scheduler.requests[rid]))
        elif (
            self.store is not None
            and self.store.resume_slots(rid, req.num_tokens)
            and (dec.store is not None or not dec.alive)
        ):
            state.from_store = True  # gone with the prefill worker, but in the KV store
            if dec.alive:
                dec.scheduler.fail_migration(rid, now)
                dec.wake()
            else:
                state.decode = None
                table.awaiting.append((state, resume_copy(req)))
        else:  # the KV is gone with the prefill worker: compute it again
            if dec.alive:
                dec.scheduler.abort_request(rid, now)
                dec.wake()
            table.resubmit(state, req)
        table.dispatch()

    async def resume(self, state: RequestState, dec: Instance, req: Request) -> None:
        """Pull the KV of a request whose decode instance died from the KV store into
        `dec`; if the store no longer has it, or the pull fails with `dec` gone, the
        request is computed again from its prompt and outputs (recovery's fallback)."""
        table, store, rid = self.table, self.store, req.request_id
        assert isinstance(dec.scheduler, DecodeScheduler) and store is not None
        skip = dec.scheduler.num_local_blocks(rid)
        slots = store.resume_slots(rid, req.num_tokens) if dec.store is not None else None
        ok = False
        if slots is not None:
            dst_blocks = dec.scheduler.blocks.block_table(rid)[skip : len(slots)]
            try:
                load = load_from_store(slots[skip:], dec.executor, dst_blocks)
                async with asyncio.timeout(self.timeout):
                    stats = await load
                ok = True
            except Exception:
                log.warning("resuming %s from the KV store into %s failed", rid, dec.name,
                            exc_info=True)  # fmt: skip
        state.migrating = False
        now = time.monotonic()
        if state.aborted:
            table.release_everywhere(state)
            store.release(rid)
            return
        if ok and dec.alive:
            dec.scheduler.finish_migration(rid, now)
            state.owner, state.decode, state.from_store = dec, None, False
            store.note_resume(req.num_tokens - 1)
            self.completed[stats.transport] += 1
            if self.on_migration:
                self.on_migration(stats)
            dec.wake()
        elif slots is not None and dec.alive:  # the store still holds it: try again
            dec.scheduler.fail_migration(rid, now)
            dec.wake()
        elif slots is not None:  # dec died too: another decode instance pulls it
            state.decode = None
            table.awaiting.append((state, resume_copy(req)))
        else:
            if dec.alive:
                dec.scheduler.abort_request(rid, now)
                dec.wake()
            state.from_store = False
            table.resubmit(state, req)
        table.dispatch()
