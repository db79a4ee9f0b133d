"""The hand-off of a prefilled request (core) and the controller's request table
(cluster/request_table.py), driven by real schedulers and stand-in instances: no worker,
no event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from distserve.cluster.request_table import RequestState, RequestTable
from distserve.core import (
    BlockManager,
    DecodeScheduler,
    PrefillScheduler,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    StepResult,
    TokenLogprobs,
)
from distserve.core.request import handoff_copy
from distserve.runtime.instance import Role


@dataclass(eq=False)
class StandIn:
    """An instance as the table sees it: a role, a scheduler, alive or not."""

    role: Role
    scheduler: Scheduler
    alive: bool = True
    wakes: int = 0

    def wake(self) -> None:
        self.wakes += 1


def _config() -> SchedulerConfig:
    return SchedulerConfig(max_model_len=64, max_num_batched_tokens=64)


def _prefill() -> StandIn:
    return StandIn(Role.PREFILL, PrefillScheduler(_config(), BlockManager(16, 4)))


def _decode() -> StandIn:
    return StandIn(Role.DECODE, DecodeScheduler(_config(), BlockManager(16, 4)))


def _prefilled(inst: StandIn, rid: str, logprobs: int | None = None) -> Request:
    """A request run through one prefill step on `inst`: first token out, KV held."""
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=logprobs)
    req = Request(rid, [5, 6, 7, 8, 9], params, 0.0)
    inst.scheduler.add_request(req)
    plan = inst.scheduler.schedule(1.0)
    lp = {rid: TokenLogprobs(100, -0.5)} if logprobs is not None else {}
    inst.scheduler.update(plan, StepResult({rid: 100}, lp), 1.0)
    assert req.status == RequestStatus.AWAITING_MIGRATION
    return req


def _state(rid: str, owner: StandIn) -> RequestState:
    return RequestState(rid, asyncio.Queue(), owner)


def test_handoff_copy_shares_nothing_either_side_changes() -> None:
    req = _prefilled(_prefill(), "a", logprobs=1)
    copy = handoff_copy(req)
    assert copy is not req and copy.status == req.status
    assert copy.output_token_ids == [100] and copy.output_logprobs == req.output_logprobs
    assert copy.output_logprobs == [TokenLogprobs(100, -0.5)]
    assert copy.timestamps == req.timestamps
    copy.append_token(101, TokenLogprobs(101, -1.0))
    copy.mark("decode_start", 2.0)
    assert req.output_token_ids == [100] and len(req.output_logprobs) == 1
    assert "decode_start" not in req.timestamps


def test_dispatch_hands_the_oldest_a_copy_on_a_decode_instance() -> None:
    pre, dec, table = _prefill(), _decode(), RequestTable()
    table.instances += [pre, dec]
    reqs = [_prefilled(pre, rid) for rid in ("a", "b")]
    states = [_state(r.request_id, pre) for r in reqs]
    table.awaiting.extend(zip(states, reqs, strict=True))
    table.dispatch()
    assert not table.awaiting
    assert [s.decode for s in states] == [dec, dec] and dec.wakes == 2
    pending = list(dec.scheduler.pending)
    assert [r.request_id for r in pending] == ["a", "b"]
    assert all(p is not r for p, r in zip(pending, reqs, strict=True))


def test_dispatch_skips_aborted_and_rescued_requests() -> None:
    pre, dec, table = _prefill(), _decode(), RequestTable()
    table.instances += [pre, dec]
    a, b = _prefilled(pre, "a"), _prefilled(pre, "b")
    gone, moved = _state("a", pre), _state("b", pre)
    gone.aborted = True
    moved.owner = _prefill()  # rescued elsewhere: its old owner's copy is stale
    table.awaiting.extend([(gone, a), (moved, b)])
    table.dispatch()
    assert not table.awaiting and not dec.scheduler.pending
    assert gone.decode is None and moved.decode is None


def test_resubmit_continues_from_the_tokens_streamed() -> None:
    old, other, table = _prefill(), _prefill(), RequestTable()
    table.instances += [old, other]
    req = _prefilled(old, "a")
    state = _state("a", old)
    table.requests["a"] = state
    old.alive = False
    table.resubmit(state, req)
    again = other.scheduler.requests["a"]
    assert state.owner is other and other.wakes == 1
    assert again is not req and again.output_token_ids == [100]
    assert again.status == RequestStatus.WAITING and again.num_preemptions == 1


def test_resubmit_without_a_live_instance_waits_as_an_orphan() -> None:
    pre, table = _prefill(), RequestTable()
    table.instances.append(pre)
    req = _prefilled(pre, "a")
    state = _state("a", pre)
    pre.alive = False
    table.resubmit(state, req)
    assert [(s, r.request_id) for _, s, r in table.orphans] == [(state, "a")]
    fresh = _prefill()
    table.instances[0] = fresh
    table.adopt_orphans()
    assert not table.orphans and state.owner is fresh
    assert fresh.scheduler.requests["a"].output_token_ids == [100]


def test_release_everywhere_frees_the_blocks_of_both_sides() -> None:
    pre, dec, table = _prefill(), _decode(), RequestTable()
    table.instances += [pre, dec]
    req = _prefilled(pre, "a")
    state = _state("a", pre)
    table.awaiting.append((state, req))
    table.dispatch()
    dec.scheduler.admit_migrations(2.0)
    assert dec.scheduler.blocks.num_used_blocks > 0
    table.release_everywhere(state)
    assert pre.scheduler.blocks.num_used_blocks == 0
    assert dec.scheduler.blocks.num_used_blocks == 0
