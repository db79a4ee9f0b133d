"""The controller's table of live requests: where each one is, the prefilled ones waiting
for a decode instance, the ones waiting for any instance at all, and the instances by
role. Migration (cluster/migration.py) and recovery (cluster/recovery.py) work on this
table, never on the controller and never on each other; the controller owns it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque

from distserve.core import DecodeScheduler, Request
from distserve.core.request import handoff_copy
from distserve.core.routing import PrefillOnDecode, pick_decode, pick_prefill
from distserve.runtime.instance import Instance, Role
from distserve.runtime.outputs import RequestOutput


@dataclasses.dataclass
class RequestState:
    """The controller's view of one live request. `owner` is the instance whose
    scheduler holds it for prefill (or for everything, colocated); `decode` the decode
    instance that has taken it over or will."""

    request_id: str
    queue: asyncio.Queue[RequestOutput | BaseException | None]
    owner: Instance
    decode: Instance | None = None
    migrating: bool = False
    aborted: bool = False
    first_token_at: float | None = None
    from_store: bool = False
    """Awaiting a decode instance with its KV in the KV store (core/kv_store.py), not on
    `owner` (a decode instance that died)."""


class RequestTable:
    """Live requests and the instances that hold them.

    Ownership: the controller adds a request on submit and removes it on finish, failure
    or abort; the table's operations move a request between instances (hand-off to a
    decode instance, re-queue for prefill) but never end it. `instances` is the
    controller's list (recovery replaces a restarted one in place)."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestState] = {}
        """Live requests by id; a request leaves on finish, failure or abort."""
        self.awaiting: deque[tuple[RequestState, Request]] = deque()
        """Prefilled requests not yet handed to a decode instance, oldest first."""
        self.orphans: list[tuple[float, RequestState, Request]] = []
        """(since, state, request): requests no live instance could take yet (all prompt-
        taking instances down and restarting); placed when one comes back."""
        self.instances: list[Instance] = []
        self.prefill_on_decode: PrefillOnDecode | None = None
        """The per-request rule (serve --prefill-on-decode), or None: prompts go to the
        prefill instances only."""

    def route(self, seq: Request) -> Instance | None:
        """The instance that prefills a new prompt: the prefill (or colocated) instance
        routing picks, or, under the per-request rule, a decode instance that then
        decodes it too (no migration)."""
        inst = pick_prefill(self.entry_instances, seq)
        rule = self.prefill_on_decode
        if rule is None:
            return inst
        return rule.pick(inst, self.decode_instances, seq) or inst

    @property
    def entry_instances(self) -> list[Instance]:
        """The instances that take prompts (prefill or colocated)."""
        return [i for i in self.instances if i.role != Role.DECODE]

    @property
    def decode_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.role == Role.DECODE]

    def dispatch(self) -> None:
        """Hand prefilled requests, oldest first, to decode instances that can queue them
        (each gets its own copy: the prefill side keeps its blocks until the KV moved)."""
        while self.awaiting:
            state, req = self.awaiting[0]
            held = state.from_store or (
                state.owner.alive and state.owner.scheduler.requests.get(req.request_id) is req
            )
            if state.aborted or req.finished or not held:
                self.awaiting.popleft()  # gone, or rescued elsewhere
                continue
            decoders = self.decode_instances
            if state.from_store:  # only a worker that maps the store can pull from it
                decoders = [i for i in decoders if i.store is not None]
            dec = pick_decode(decoders)
            if dec is None:
                return
            self.awaiting.popleft()
            assert isinstance(dec.scheduler, DecodeScheduler)
            dec.scheduler.add_migrating(handoff_copy(req))
            state.decode = dec
            dec.wake()

    def release_everywhere(self, state: RequestState) -> None:
        """Drop the request from every live instance that holds it (frees its blocks)."""
        now = time.monotonic()
        for inst in (state.owner, state.decode):
            if inst is not None and inst.alive:
                inst.scheduler.abort_request(state.request_id, now)
                inst.wake()

    def resubmit(self, state: RequestState, req: Request, preempted: bool = True) -> None:
        """Queue a request again on a live prompt-taking instance, from its prompt plus the
        tokens already produced; its next token continues the stream. With none alive it
        waits among the orphans. `preempted`: count it as a preemption (its work is lost);
        a queued request moved before it ran is not."""
        now = time.monotonic()
        for inst in (state.owner, state.decode):
            if inst is not None and inst.alive:
                inst.scheduler.abort_request(state.request_id, now)  # drop stale copies
        again = Request(
            req.request_id, list(req.prompt_token_ids), req.sampling_params, req.arrival_time,
            eos_token_id=req.eos_token_id, output_token_ids=list(req.output_token_ids),
            output_logprobs=list(req.output_logprobs), timestamps=dict(req.timestamps),
            num_preemptions=req.num_preemptions + preempted,
            num_cached_tokens=req.num_cached_tokens,
        )  # fmt: skip
        state.decode, state.migrating = None, False
        target = pick_prefill(self.entry_instances, again)
        if target is None:
            self.orphans.append((now, state, again))
            return
        self.place(state, again, target)

    def place(self, state: RequestState, req: Request, inst: Instance) -> None:
        """Queue `req` for prefill on `inst`, which becomes its owner."""
        state.owner = inst
        inst.scheduler.add_request(req)
        inst.wake()

    def adopt_orphans(self) -> None:
        """Place the orphans that a live instance can take now."""
        waiting, self.orphans = self.orphans, []
        for since, state, req in waiting:
            if state.aborted:
                continue
            target = pick_prefill(self.entry_instances, req)
            if target is None:
                self.orphans.append((since, state, req))
            else:
                self.place(state, req, target)
