"""The prefill instance of a disaggregated pair: prompts in, first tokens and KV out."""

from __future__ import annotations

from distserve.core.plan import StepPlan
from distserve.core.request import Request, RequestStatus
from distserve.core.scheduler.base import Scheduler


class PrefillScheduler(Scheduler):
    """FCFS batches of whole prompts under a prompt-token budget, while blocks allow.

    After its prefill a request keeps its blocks in AWAITING_MIGRATION until a decode
    instance confirms it has pulled the KV (`release_migrated`). Back-pressure: while such
    requests hold more than `max_migration_hold` of the blocks, no new prompt is admitted,
    so a slow decode side cannot make this instance fill up and thrash.
    """

    def schedule(self, now: float) -> StepPlan:
        if self.migration_hold_exceeded():
            return StepPlan(self._next_step_id())
        chunks = self._admit_whole(now, RequestStatus.PREFILLING)
        return StepPlan(self._next_step_id(), tuple(chunks), loads=self._take_loads())

    def _on_sampled(self, req: Request, now: float) -> None:
        req.mark("prefill_end", now)
        req.status = RequestStatus.AWAITING_MIGRATION
        self.running.remove(req)

    # ---- migration, prefill side --------------------------------------------------
    def awaiting_migration(self) -> list[Request]:
        """Requests whose KV waits to be pulled, oldest first."""
        return [r for r in self.requests.values() if r.status == RequestStatus.AWAITING_MIGRATION]

    def migration_hold_exceeded(self) -> bool:
        held = sum(self.blocks.num_blocks_of(r.request_id) for r in self.awaiting_migration())
        return held > self.config.max_migration_hold * self.blocks.num_blocks

    def release_migrated(self, request_id: str, now: float) -> Request:
        """The decode side confirmed the copy: free the blocks and hand the request over.
        Only now are the blocks freed, so a failed pull can be retried from here."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.AWAITING_MIGRATION:
            state = "unknown" if req is None else req.status.name
            raise KeyError(f"request {request_id} is not awaiting migration here ({state})")
        del self.requests[request_id]
        self.blocks.free(request_id)
        return req
