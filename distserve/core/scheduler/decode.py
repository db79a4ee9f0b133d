"""The decode instance of a disaggregated pair: migrated requests in, tokens out."""

from __future__ import annotations

from collections import deque

from distserve.core.block_manager import BlockManager
from distserve.core.config import SchedulerConfig
from distserve.core.plan import ScheduledChunk, StepPlan
from distserve.core.request import Request, RequestStatus
from distserve.core.scheduler.base import Scheduler


class DecodeScheduler(Scheduler):
    """Continuous batching of migrated requests.

    A request arrives from a prefill instance with its prompt computed there and its first
    token sampled (`add_migrating`). It waits in `pending` until `admit_migrations` finds
    blocks for its KV; then the runtime pulls the KV into those blocks and calls
    `finish_migration` (or `fail_migration`, which frees them). From then on every step
    gives it one token. When blocks run out, the newest request is preempted: swapped to
    host memory, or dropped and later recomputed here from its prompt and outputs. A new
    prompt given to `add_request` (core/routing.py's PrefillOnDecode) is prefilled here the
    same way, in one chunk beside the decodes, and then decodes here: no migration.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        swap_blocks: BlockManager | None = None,
    ) -> None:
        super().__init__(config, blocks, swap_blocks)
        self.pending: deque[Request] = deque()
        self._local: dict[str, int] = {}
        """Migrating request -> blocks at the head of its table that this instance's
        prefix cache already held: the pull skips them."""

    # ---- migration, decode side ---------------------------------------------------
    def can_accept(self) -> bool:
        """Whether the pending queue has room (the router asks before sending)."""
        return len(self.pending) < self.config.max_pending_migrations

    def add_migrating(self, req: Request) -> None:
        """Take over a prefilled request; its KV [0, num_computed_tokens) is remote."""
        if req.status != RequestStatus.AWAITING_MIGRATION or req.num_output_tokens < 1:
            raise ValueError(
                f"request {req.request_id} is not a prefilled request ({req.status.name})"
            )
        self.check_request(req)
        self.requests[req.request_id] = req
        self.pending.append(req)

    def admit_migrations(self, now: float) -> list[Request]:
        """Allocate blocks for pending requests, FCFS, while blocks (above the watermark)
        and seats allow. Each returned request is MIGRATING: its block table is where
        the pulled KV goes, except its first `num_local_blocks` blocks, prefix-cache hits
        here (only what this instance lacks moves)."""
        admitted: list[Request] = []
        while self.pending and self._num_active() < self.config.max_num_seqs:
            req = self.pending[0]
            # The prompt's full blocks this instance holds already need not move.
            cached = self.blocks.lookup(req)
            if not self.blocks.can_allocate(
                req.request_id, req.num_tokens, admit=True, cached=cached
            ):
                break
            self.pending.popleft()
            self.blocks.allocate(req.request_id, req.num_tokens, cached)
            self._local[req.request_id] = len(cached)
            req.status = RequestStatus.MIGRATING
            req.mark("migration_start", now)
            admitted.append(req)
        return admitted

    def num_local_blocks(self, request_id: str) -> int:
        """Blocks at the head of a migrating request's table that hold its KV already
        (prefix-cache hits here): a pull copies source blocks [n:] into table [n:]."""
        return self._local.get(request_id, 0)

    def finish_migration(self, request_id: str, now: float) -> None:
        """The KV has arrived: the request joins the running batch, and its full blocks
        join this instance's prefix cache (a recompute here, or a later migration of the
        same prefix, finds them)."""
        req = self._migrating(request_id)
        self._local.pop(request_id, None)
        self.blocks.cache_blocks(req, req.num_computed_tokens)
        req.status = RequestStatus.DECODING
        req.mark("migration_end", now)
        self.running.append(req)

    def fail_migration(self, request_id: str, now: float) -> Request:
        """The pull failed: free the blocks and put the request back in front of the queue
        (the prefill side still holds the KV, so it can be tried again)."""
        req = self._migrating(request_id)
        self._local.pop(request_id, None)
        self.blocks.free(request_id)  # never named: a failed pull may have left garbage
        req.status = RequestStatus.AWAITING_MIGRATION
        self.pending.appendleft(req)
        return req

    def _migrating(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.MIGRATING:
            state = "unknown" if req is None else req.status.name
            raise KeyError(f"request {request_id} is not migrating here ({state})")
        return req

    def _num_active(self) -> int:
        return len(self.running) + sum(
            1 for r in self.requests.values() if r.status == RequestStatus.MIGRATING
        )

    def _drop_from_queues(self, req: Request) -> None:
        super()._drop_from_queues(req)
        self._local.pop(req.request_id, None)
        if req in self.pending:
            self.pending.remove(req)

    def _on_sampled(self, req: Request, now: float) -> None:
        if "prefill_end" not in req.timestamps:  # once: a prompt prefilled here got its first token
            req.mark("prefill_end", now)

    # ---- steps --------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        chunks: list[ScheduledChunk] = self._schedule_decodes(now, swap_out)
        if not swap_out:
            chunks += [self._chunk(r, 1) for r in self._swap_in(swap_in)]
            # Preempted-by-recompute requests rebuild their KV here, in one chunk each.
            chunks += self._admit_whole(now, RequestStatus.DECODING)
        return StepPlan(self._next_step_id(), tuple(chunks), tuple(swap_out), tuple(swap_in))

    @property
    def num_queued_tokens(self) -> int:
        return super().num_queued_tokens + sum(r.num_tokens for r in self.pending)
