"""The schedulers driven by hand through the step contract

    plan = scheduler.schedule(now); result = executor.execute(plan); scheduler.update(...)

with a fake executor that keeps a fake paged KV cache: the "KV" of position p of request
r is (r, p, token id). Before every chunk it checks that the request's cached positions
[0, start) read back through the chunk's block table exactly as written, so a block
freed too early, a wrong swap pair or a lost token shows up as a wrong read.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    FinishReason,
    PrefillScheduler,
    Request,
    RequestStatus,
    SamplingParams,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    StepOutput,
    StepPlan,
    StepResult,
)

EOS = 2
Slot = tuple[str, int, int]
"""What the fake KV cache holds at one position: (request id, position, token id)."""
TokenFn = Callable[[tuple[int, ...], int], int]
"""The fake model: (every token id of the context, output index) -> the sampled token."""


def counting(context: tuple[int, ...], index: int) -> int:
    """Output i of every request is 100 + i: a lost or repeated token shows at once."""
    return 100 + index


def outputs_of(n: int) -> list[int]:
    return [100 + i for i in range(n)]


@dataclass
class FakeExecutor:
    """Executes plans against a fake paged KV cache, checking each plan against the
    scheduler's state first. Like a model, it samples from the whole context: the cached
    tokens, read back from the KV cache, and the chunk's own."""

    sched: Scheduler
    token: TokenFn = counting
    device: dict[int, dict[int, Slot]] = field(default_factory=dict)
    host: dict[int, dict[int, Slot]] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for dev, hst in plan.swap_out:
            self.host[hst] = dict(self.device.get(dev, {}))
        for hst, dev in plan.swap_in:
            self.device[dev] = dict(self.host.get(hst, {}))
        assert not plan.block_copies
        ids = [c.request_id for c in plan.chunks]
        assert len(ids) == len(set(ids)), f"a request twice in one plan: {ids}"
        sampled: dict[str, int] = {}
        for chunk in plan.chunks:
            cached = self._check_chunk(chunk)
            self._run_chunk(chunk)
            if chunk.sampling_params is not None:
                context = cached + chunk.token_ids
                sampled[chunk.request_id] = self.token(context, chunk.output_index)
        return StepResult(sampled=sampled)

    def _check_chunk(self, chunk: ScheduledChunk) -> tuple[int, ...]:
        """Check the chunk against the request; return the cached context's token ids."""
        sched = self.sched
        req = sched.requests[chunk.request_id]
        assert req in sched.running
        start, end = chunk.start, chunk.context_len
        assert start == req.num_computed_tokens
        assert chunk.num_tokens >= 1 and end <= req.num_tokens
        assert chunk.token_ids == tuple(req.all_token_ids[start:end])
        assert (chunk.sampling_params is not None) == (end == req.num_tokens)
        if chunk.sampling_params is not None:
            assert chunk.sampling_params is req.sampling_params
        assert chunk.output_index == req.num_output_tokens
        assert chunk.block_table == tuple(sched.blocks.block_table(req.request_id))
        assert len(chunk.block_table) >= sched.blocks.blocks_for(end)
        cached = []
        for p in range(start):
            slot = self.read(chunk.block_table, p)
            assert slot == (req.request_id, p, req.all_token_ids[p])
            cached.append(slot[2])
        return tuple(cached)

    def _run_chunk(self, chunk: ScheduledChunk) -> None:
        for i, tok in enumerate(chunk.token_ids):
            p = chunk.start + i
            self.write(chunk.block_table, p, (chunk.request_id, p, tok))

    def read(self, table: tuple[int, ...] | list[int], p: int) -> Slot | None:
        bs = self.sched.blocks.block_size
        return self.device.get(table[p // bs], {}).get(p % bs)

    def write(self, table: tuple[int, ...] | list[int], p: int, slot: Slot) -> None:
        bs = self.sched.blocks.block_size
        self.device.setdefault(table[p // bs], {})[p % bs] = slot


# ---- builders --------------------------------------------------------------------------


def config(**kw: object) -> SchedulerConfig:
    kw.setdefault("max_model_len", 64)
    kw.setdefault("max_num_batched_tokens", 64)
    return SchedulerConfig(**kw)  # type: ignore[arg-type]


def blocks(num_blocks: int = 64, block_size: int = 4, watermark: float = 0.0) -> BlockManager:
    return BlockManager(num_blocks, block_size, watermark)


def request(
    rid: str,
    prompt_len: int,
    max_tokens: int = 4,
    *,
    arrival: float = 0.0,
    ignore_eos: bool = True,
    stop_token_ids: tuple[int, ...] = (),
) -> Request:
    params = SamplingParams(
        max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids
    )
    base = 1000 * (1 + sum(map(ord, rid)) % 50)
    prompt = [base + i for i in range(prompt_len)]
    return Request(rid, prompt, params, arrival, eos_token_id=EOS)


def step(sched: Scheduler, ex: FakeExecutor, now: float) -> tuple[StepPlan, list[StepOutput]]:
    plan = sched.schedule(now)
    outputs = sched.update(plan, ex.execute(plan), now)
    check(sched)
    return plan, outputs


def check(sched: Scheduler) -> None:
    sched.blocks.check_integrity()
    if sched.swap_blocks is not None:
        sched.swap_blocks.check_integrity()


def drain(sched: Scheduler, ex: FakeExecutor, now: float = 1.0, max_steps: int = 500) -> float:
    """Step until every request has finished; returns the clock."""
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return now
        step(sched, ex, now)
        now += 1.0
    raise AssertionError(f"not finished after {max_steps} steps: {sched.requests}")


def assert_all_free(sched: Scheduler) -> None:
    check(sched)
    assert sched.blocks.num_used_blocks == 0
    if sched.swap_blocks is not None:
        assert sched.swap_blocks.num_used_blocks == 0


def ids(plan: StepPlan) -> list[str]:
    return [c.request_id for c in plan.chunks]


# ---- colocated, prefill first ------------------------------------------------------------


def test_prompts_run_as_one_batch_fcfs_under_the_token_budget() -> None:
    sched = ColocatedScheduler(config(max_num_batched_tokens=32, max_model_len=32), blocks())
    ex = FakeExecutor(sched)
    for rid, n in [("a", 10), ("b", 10), ("c", 10), ("d", 5), ("e", 1)]:
        sched.add_request(request(rid, n))
    assert sched.num_queued_tokens == 36
    plan, outputs = step(sched, ex, 1.0)
    # d (5 tokens) does not fit the 2 left; e (1 token) would, but FCFS does not skip.
    assert ids(plan) == ["a", "b", "c"]
    assert all(c.start == 0 and c.is_prefill for c in plan.chunks)
    assert plan.num_tokens == 30
    assert [c.token_ids for c in plan.chunks] == [
        tuple(sched.requests[r].prompt_token_ids) for r in "abc"
    ]
    assert [o.new_token_ids for o in outputs] == [[100]] * 3
    assert [r.request_id for r in sched.waiting] == ["d", "e"]
    assert {r.request_id: r.status for r in sched.running} == dict.fromkeys(
        "abc", RequestStatus.DECODING
    )
    # Prompts come before decodes: d and e are prefilled next, a-c get no token.
    plan, _ = step(sched, ex, 2.0)
    assert ids(plan) == ["d", "e"]
    assert all(sched.requests[r].num_output_tokens == 1 for r in "abc")


def test_a_prompt_that_does_not_fit_waits_without_skipping() -> None:
    sched = ColocatedScheduler(config(max_num_batched_tokens=32, max_model_len=32), blocks())
    ex = FakeExecutor(sched)
    for rid, n in [("a", 10), ("b", 30), ("c", 2)]:
        sched.add_request(request(rid, n))
    plan, _ = step(sched, ex, 1.0)
    assert ids(plan) == ["a"]
    plan, _ = step(sched, ex, 2.0)
    assert ids(plan) == ["b", "c"] and plan.num_tokens == 32


def test_prompt_batch_is_capped_by_max_num_seqs() -> None:
    sched = ColocatedScheduler(config(max_num_seqs=2), blocks())
    ex = FakeExecutor(sched)
    for rid in "abcd":
        sched.add_request(request(rid, 3, max_tokens=3))
    plan, _ = step(sched, ex, 1.0)
    assert ids(plan) == ["a", "b"]
    # The seats are taken: the next steps decode a and b until they finish.
    plan, _ = step(sched, ex, 2.0)
    assert ids(plan) == ["a", "b"] and plan.decode_chunks == plan.chunks
    step(sched, ex, 3.0)
    assert not sched.running
    plan, _ = step(sched, ex, 4.0)
    assert ids(plan) == ["c", "d"]


def test_a_prompt_waits_for_blocks_in_fcfs_order() -> None:
    # 4 blocks of 4 tokens: a takes 3 blocks, b needs 2: it waits although c needs 1.
    sched = ColocatedScheduler(config(), blocks(4))
    ex = FakeExecutor(sched)
    sched.add_request(request("a", 12, max_tokens=1))
    sched.add_request(request("b", 8, max_tokens=1))
    sched.add_request(request("c", 4, max_tokens=1))
    plan, _ = step(sched, ex, 1.0)
    assert ids(plan) == ["a"]
    plan, _ = step(sched, ex, 2.0)
    assert ids(plan) == ["b", "c"]
    assert_all_free(sched)


def test_decode_steps_give_every_running_request_exactly_one_token() -> None:
    sched = ColocatedScheduler(config(), blocks())
    ex = FakeExecutor(sched)
    prompts = {"a": 3, "b": 5, "c": 8}
    for rid, n in prompts.items():
        sched.add_request(request(rid, n, max_tokens=5))
    step(sched, ex, 1.0)
    for k in range(1, 5):
        plan, outputs = step(sched, ex, 1.0 + k)
        assert ids(plan) == ["a", "b", "c"]
        assert plan.decode_chunks == plan.chunks and plan.num_tokens == 3
        for c in plan.chunks:
            assert c.start == prompts[c.request_id] + k - 1
            assert c.token_ids == (100 + k - 1,)  # the KV of the last output
            assert c.output_index == k
        assert [o.new_token_ids for o in outputs] == [[100 + k]] * 3
    assert not sched.has_unfinished()
    assert_all_free(sched)


def test_new_prompts_run_before_decodes() -> None:
    sched = ColocatedScheduler(config(), blocks())
    ex = FakeExecutor(sched)
    sched.add_request(request("a", 4, max_tokens=6))
    step(sched, ex, 1.0)
    step(sched, ex, 2.0)
    sched.add_request(request("b", 4, max_tokens=6))
    plan, _ = step(sched, ex, 3.0)
    assert ids(plan) == ["b"] and plan.chunks[0].start == 0
    assert sched.requests["a"].num_output_tokens == 2
    plan, _ = step(sched, ex, 4.0)
    assert ids(plan) == ["a", "b"] and plan.decode_chunks == plan.chunks


def _run_one(req: Request, token: TokenFn = counting, **cfg: object) -> Request:
    sched = ColocatedScheduler(config(**cfg), blocks())
    sched.add_request(req)
    drain(sched, FakeExecutor(sched, token))
    assert_all_free(sched)
    assert not sched.requests
    return req


def test_stop_by_max_tokens() -> None:
    req = _run_one(request("a", 5, max_tokens=4))
    assert req.output_token_ids == outputs_of(4)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.finish_reason == FinishReason.LENGTH


def test_stop_by_max_tokens_one_finishes_at_prefill() -> None:
    req = _run_one(request("a", 5, max_tokens=1))
    assert req.output_token_ids == [100]
    assert req.status == RequestStatus.FINISHED_LENGTH


def eos_at(index: int) -> TokenFn:
    return lambda ctx, i: EOS if i == index else counting(ctx, i)


def test_stop_by_eos() -> None:
    req = _run_one(request("a", 5, max_tokens=10, ignore_eos=False), eos_at(2))
    assert req.output_token_ids == [100, 101, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.finish_reason == FinishReason.STOP


def test_eos_on_the_first_token_stops_at_prefill() -> None:
    req = _run_one(request("a", 5, max_tokens=10, ignore_eos=False), eos_at(0))
    assert req.output_token_ids == [EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos_keeps_going() -> None:
    req = _run_one(request("a", 5, max_tokens=5, ignore_eos=True), eos_at(2))
    assert req.output_token_ids == [100, 101, EOS, 103, 104]
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_stop_by_stop_token_ids_even_with_ignore_eos() -> None:
    req = _run_one(request("a", 5, max_tokens=10, stop_token_ids=(102,), ignore_eos=True), counting)
    assert req.output_token_ids == [100, 101, 102]
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_stop_by_max_model_len() -> None:
    req = _run_one(request("a", 10, max_tokens=100), max_model_len=16, max_num_batched_tokens=16)
    # prompt + outputs reach max_model_len and stop there.
    assert req.num_tokens == 16
    assert req.output_token_ids == outputs_of(6)
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_requests_that_can_never_run_are_rejected() -> None:
    sched = ColocatedScheduler(config(max_model_len=16, max_num_batched_tokens=16), blocks(4))
    with pytest.raises(ValueError, match="exceed max_model_len"):
        sched.add_request(request("a", 17))
    with pytest.raises(ValueError, match="KV blocks"):
        # 16 tokens at its peak: 4 blocks of 4 fit, but 5 blocks of 4 would not.
        ColocatedScheduler(config(), blocks(4)).add_request(request("b", 16, max_tokens=2))
    sched.add_request(request("c", 4))
    with pytest.raises(ValueError, match="in use"):
        sched.add_request(request("c", 4))


def test_a_request_is_rejected_if_it_could_never_be_admitted_above_the_watermark() -> None:
    # 4 blocks, 1 kept free for admission: a 13-token prompt needs all 4 and would wait
    # forever at the head of the queue.
    sched = ColocatedScheduler(config(), blocks(4, watermark=0.25))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(request("a", 13, max_tokens=1))
    sched.add_request(request("b", 11, max_tokens=1))
    drain(sched, FakeExecutor(sched))
    assert_all_free(sched)


def test_timestamps_record_the_given_clock_in_order() -> None:
    sched = ColocatedScheduler(config(), blocks())
    ex = FakeExecutor(sched)
    req = request("a", 4, max_tokens=3, arrival=0.5)
    sched.add_request(req)
    times = iter([(1.0, 1.25), (2.0, 2.25), (3.0, 3.25)])
    while sched.has_unfinished():
        t_schedule, t_update = next(times)
        plan = sched.schedule(t_schedule)
        sched.update(plan, ex.execute(plan), t_update)
    assert req.timestamps == {
        "arrived": 0.5,
        "prefill_start": 1.0,
        "prefill_end": 1.25,
        "decode_start": 2.0,
        "decode_end": 3.25,
        "finished": 3.25,
    }


# ---- colocated, chunked prefill ------------------------------------------------------------


def test_chunked_prefill_keeps_the_budget_and_puts_decodes_first() -> None:
    budget = 8
    sched = ColocatedScheduler(
        config(chunked_prefill=True, max_num_batched_tokens=budget), blocks()
    )
    ex = FakeExecutor(sched)
    sched.add_request(request("short", 3, max_tokens=12))
    step(sched, ex, 1.0)
    sched.add_request(request("long", 30, max_tokens=2))
    long_chunks: list[ScheduledChunk] = []
    now = 2.0
    while sched.has_unfinished():
        plan, _ = step(sched, ex, now)
        now += 1
        assert plan.num_tokens <= budget
        # The running decode goes first, then the prompt chunk.
        if len(plan.chunks) == 2:
            assert ids(plan) == ["short", "long"]
            assert plan.chunks[0].num_tokens == 1
        long_chunks += [c for c in plan.chunks if c.request_id == "long"]
    prompt = [c for c in long_chunks if c.start < 30]
    # 30 prompt tokens in chunks of 7 (the budget less the decode token) and a rest of 2.
    assert [c.num_tokens for c in prompt] == [7, 7, 7, 7, 2]
    assert [c.start for c in prompt] == [0, 7, 14, 21, 28]
    assert [c.sampling_params is None for c in prompt] == [True] * 4 + [False]
    assert sum((c.token_ids for c in prompt), ()) == tuple(request("long", 30).prompt_token_ids)
    assert len(long_chunks) == 6 and long_chunks[-1].start == 30


def test_chunked_prefill_finishes_a_long_prompt_alone_in_budget_sized_chunks() -> None:
    sched = ColocatedScheduler(config(chunked_prefill=True, max_num_batched_tokens=5), blocks())
    ex = FakeExecutor(sched)
    req = request("a", 12, max_tokens=2)
    sched.add_request(req)
    plans = [step(sched, ex, float(t))[0] for t in range(4)]
    assert [(c.start, c.num_tokens) for p in plans for c in p.chunks] == [
        (0, 5),
        (5, 5),
        (10, 2),
        (12, 1),
    ]
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.timestamps["prefill_start"] == 0.0 and req.timestamps["prefill_end"] == 2.0
    assert_all_free(sched)


def test_chunked_prefill_admits_several_prompts_and_splits_the_last() -> None:
    sched = ColocatedScheduler(config(chunked_prefill=True, max_num_batched_tokens=10), blocks())
    ex = FakeExecutor(sched)
    for rid, n in [("a", 4), ("b", 4), ("c", 9)]:
        sched.add_request(request(rid, n, max_tokens=3))
    plan, _ = step(sched, ex, 1.0)
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 4), ("b", 4), ("c", 2)]
    assert [c.sampling_params is None for c in plan.chunks] == [False, False, True]
    plan, _ = step(sched, ex, 2.0)
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("a", 4, 1),
        ("b", 4, 1),
        ("c", 2, 7),
    ]
    drain(sched, ex, 3.0)
    assert_all_free(sched)


def test_chunked_prefill_switched_off_and_on_midway_loses_and_repeats_nothing() -> None:
    """Adaptive re-planning switches a live instance's policy (reconfigure): a prompt that
    chunks left partly computed runs its rest first, whole; every token comes once."""
    chunked = config(chunked_prefill=True, max_num_batched_tokens=5)
    sched = ColocatedScheduler(chunked, blocks())
    ex = FakeExecutor(sched)
    a, b = request("a", 12, max_tokens=6), request("b", 9, max_tokens=3)
    sched.add_request(a)
    step(sched, ex, 0.0)
    sched.reconfigure(config())  # off, with a whole prompt's budget
    sched.add_request(b)
    plan, _ = step(sched, ex, 1.0)
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("a", 5, 7)]
    plan, _ = step(sched, ex, 2.0)
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("b", 0, 9)]
    sched.reconfigure(chunked)  # on again
    sched.add_request(request("c", 12, max_tokens=2))
    plan, _ = step(sched, ex, 3.0)
    assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 1), ("c", 3)]
    drain(sched, ex, 4.0)
    assert a.output_token_ids == outputs_of(6) and b.output_token_ids == outputs_of(3)
    assert_all_free(sched)
    with pytest.raises(ValueError, match="only chunked prefill"):
        sched.reconfigure(config(max_num_seqs=3))


# ---- preemption ------------------------------------------------------------------------


def _two_growing(sched: Scheduler) -> tuple[Request, Request]:
    a, b = request("a", 4, max_tokens=8), request("b", 4, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    return a, b


def test_preemption_by_recompute() -> None:
    # 5 blocks of 4: a and b each grow to 3 blocks; at 9 tokens the newest (b) must go.
    # c (16 tokens) waits for blocks all along.
    sched = ColocatedScheduler(config(), blocks(5))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    c = request("c", 16, max_tokens=1)
    sched.add_request(c)
    now = 1.0
    while not b.num_preemptions:
        plan, _ = step(sched, ex, now)
        now += 1
    assert ids(plan) == ["a"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c] and b not in sched.running
    assert not sched.blocks.has("b")
    assert b.output_token_ids == outputs_of(5) and sched.num_preemptions == 1
    drain(sched, ex, now)
    recompute = [c for p in ex.plans for c in p.chunks if c.request_id == "b" and c.start == 0]
    assert len(recompute) == 2
    assert recompute[1].token_ids == tuple(b.prompt_token_ids + outputs_of(5))
    assert recompute[1].sampling_params is not None and recompute[1].output_index == 5
    assert a.output_token_ids == outputs_of(8) and b.output_token_ids == outputs_of(8)
    assert c.output_token_ids == outputs_of(1)
    assert b.timestamps["finished"] < c.timestamps["prefill_start"]
    assert a.num_preemptions == 0 and b.num_preemptions == 1
    assert_all_free(sched)


def test_chunked_preemption_by_recompute_rebuilds_in_chunks() -> None:
    sched = ColocatedScheduler(config(chunked_prefill=True, max_num_batched_tokens=4), blocks(5))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    drain(sched, ex)
    assert b.num_preemptions >= 1
    assert all(p.num_tokens <= 4 for p in ex.plans)
    assert a.output_token_ids == outputs_of(8) and b.output_token_ids == outputs_of(8)
    assert_all_free(sched)


def test_preemption_by_swap() -> None:
    cfg = config(preemption_mode="swap")
    sched = ColocatedScheduler(cfg, blocks(5), swap_blocks=blocks(8))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    now = 1.0
    while not b.num_preemptions:
        plan, _ = step(sched, ex, now)
        now += 1
    assert ids(plan) == ["a"]
    assert b.status == RequestStatus.SWAPPED and list(sched.swapped) == [b]
    assert b.num_computed_tokens == 8 and b.output_token_ids == outputs_of(5)
    host = sched.swap_blocks.block_table("b")  # type: ignore[union-attr]
    assert len(plan.swap_out) == 2 and [h for _, h in plan.swap_out] == host
    assert not sched.blocks.has("b")
    # While it is swapped out no prompt is admitted, and a keeps decoding.
    sched.add_request(request("c", 2, max_tokens=1))
    plan, _ = step(sched, ex, now)
    now += 1
    assert ids(plan) == ["a"] and not plan.swap_in
    while b.status == RequestStatus.SWAPPED:
        plan, _ = step(sched, ex, now)
        now += 1
    assert b.status == RequestStatus.DECODING
    assert [h for h, _ in plan.swap_in] == host
    device = sched.blocks.block_table("b")
    assert [d for _, d in plan.swap_in] == device[: len(host)]
    (chunk,) = [c for c in plan.chunks if c.request_id == "b"]
    assert chunk.start == 8 and chunk.token_ids == (104,) and chunk.output_index == 5
    drain(sched, ex, now)
    assert a.output_token_ids == outputs_of(8) and b.output_token_ids == outputs_of(8)
    assert b.num_preemptions == 1
    assert_all_free(sched)


def test_swap_falls_back_to_recompute_without_host_room() -> None:
    cfg = config(preemption_mode="swap")
    sched = ColocatedScheduler(cfg, blocks(5), swap_blocks=blocks(1))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    drain(sched, ex)
    assert b.num_preemptions == 1
    assert not any(p.swap_out or p.swap_in for p in ex.plans)
    assert a.output_token_ids == outputs_of(8) and b.output_token_ids == outputs_of(8)
    assert_all_free(sched)


def test_swap_mode_needs_host_blocks() -> None:
    with pytest.raises(ValueError, match="swap"):
        ColocatedScheduler(config(preemption_mode="swap"), blocks())


# ---- prefill instance ------------------------------------------------------------------


def prefilled(
    rids: list[str], prompt_len: int = 8, max_tokens: int = 6, now: float = 1.0
) -> tuple[PrefillScheduler, FakeExecutor, list[Request]]:
    sched = PrefillScheduler(config(), blocks())
    ex = FakeExecutor(sched)
    reqs = [request(rid, prompt_len, max_tokens) for rid in rids]
    for r in reqs:
        sched.add_request(r)
    step(sched, ex, now)
    return sched, ex, reqs


def test_prefill_keeps_blocks_until_release() -> None:
    sched, ex, (a, b) = prefilled(["a", "b"])
    assert not sched.running
    for r in (a, b):
        assert r.status == RequestStatus.AWAITING_MIGRATION
        assert r.output_token_ids == [100] and r.num_computed_tokens == 8
        assert sched.blocks.num_blocks_of(r.request_id) == 2
        assert r.timestamps["prefill_end"] == 1.0
    assert sched.awaiting_migration() == [a, b]
    assert sched.schedule(2.0).empty
    assert sched.release_migrated("a", 3.0) is a
    assert not sched.blocks.has("a") and sched.blocks.num_used_blocks == 2
    assert a.status == RequestStatus.AWAITING_MIGRATION  # now the decode side's to change
    assert sched.requests == {"b": b}
    with pytest.raises(KeyError):
        sched.release_migrated("a", 3.0)
    sched.release_migrated("b", 3.0)
    assert_all_free(sched)
    assert not sched.has_unfinished()


def test_release_of_a_request_not_yet_prefilled_raises() -> None:
    sched = PrefillScheduler(config(), blocks())
    sched.add_request(request("a", 4))
    with pytest.raises(KeyError, match="WAITING"):
        sched.release_migrated("a", 0.0)


def test_prefill_max_tokens_one_finishes_and_frees() -> None:
    sched, ex, (a,) = prefilled(["a"], max_tokens=1)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [100]
    assert not sched.has_unfinished() and not sched.awaiting_migration()
    assert_all_free(sched)


def test_prefill_batches_fcfs_under_budget_and_seats() -> None:
    sched = PrefillScheduler(
        config(max_num_seqs=3, max_num_batched_tokens=20, max_model_len=20), blocks()
    )
    ex = FakeExecutor(sched)
    for rid, n in [("a", 6), ("b", 6), ("c", 9), ("d", 1), ("e", 1), ("f", 1), ("g", 1)]:
        sched.add_request(request(rid, n))
    assert [ids(step(sched, ex, float(t))[0]) for t in range(3)] == [
        ["a", "b"],
        ["c", "d", "e"],
        ["f", "g"],
    ]


def test_prefill_back_pressure_from_unmigrated_requests() -> None:
    # 10 blocks, hold limit 0.5: more than 5 blocks awaiting migration stops admission.
    sched = PrefillScheduler(config(max_migration_hold=0.5), blocks(10))
    ex = FakeExecutor(sched)
    for i in range(4):
        sched.add_request(request(f"r{i}", 8))  # 2 blocks each
    sched.add_request(request("late", 4))
    plan, _ = step(sched, ex, 1.0)
    assert ids(plan) == ["r0", "r1", "r2", "r3", "late"]
    assert sched.migration_hold_exceeded()
    sched.add_request(request("next", 4))
    assert sched.schedule(2.0).empty
    assert sched.waiting[0].request_id == "next"
    sched.release_migrated("r0", 3.0)  # 7 blocks held: still too many
    assert sched.schedule(3.0).empty
    sched.release_migrated("r1", 4.0)  # 5 blocks: no longer more than half
    assert not sched.migration_hold_exceeded()
    plan, _ = step(sched, ex, 4.0)
    assert ids(plan) == ["next"]


# ---- decode instance -------------------------------------------------------------------


KV = list[Slot]
"""The fake KV of a request's positions [0, num_computed_tokens), in order."""


def hand_over(
    pre: PrefillScheduler, pre_ex: FakeExecutor, dec: DecodeScheduler, rid: str, now: float
) -> tuple[Request, KV]:
    """Prefill side lets go of a prefilled request, the decode side queues it. Returns the
    request and a copy of its KV, taken before the prefill blocks can be reused."""
    table = pre.blocks.block_table(rid)
    req = pre.requests[rid]
    kv = []
    for p in range(req.num_computed_tokens):
        slot = pre_ex.read(table, p)
        assert slot == (rid, p, req.all_token_ids[p])
        kv.append(slot)
    assert pre.release_migrated(rid, now) is req
    dec.add_migrating(req)
    return req, kv


def migrate(dec: DecodeScheduler, dec_ex: FakeExecutor, req: Request, kv: KV, now: float) -> None:
    """The runtime's part: pull the KV into the admitted blocks, then confirm."""
    assert req.status == RequestStatus.MIGRATING
    table = dec.blocks.block_table(req.request_id)
    assert len(table) >= dec.blocks.blocks_for(req.num_tokens)
    for p, slot in enumerate(kv):
        dec_ex.write(table, p, slot)
    dec.finish_migration(req.request_id, now)


def decode_side(
    num_blocks: int = 64, watermark: float = 0.0, **cfg: object
) -> tuple[DecodeScheduler, FakeExecutor]:
    sched = DecodeScheduler(config(**cfg), blocks(num_blocks, watermark=watermark))
    return sched, FakeExecutor(sched)


def test_decode_admits_migrations_above_the_watermark() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b", "c"])
    dec, dec_ex = decode_side(num_blocks=10, watermark=0.2)  # 2 blocks kept
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    assert list(dec.pending) == reqs
    assert all(r.status == RequestStatus.AWAITING_MIGRATION for r in reqs)
    assert dec.num_queued_tokens == 27
    # 9 tokens -> 3 blocks each: a and b leave 4 free, c would leave 1 < 2.
    admitted = dec.admit_migrations(3.0)
    assert admitted == reqs[:2]
    assert all(r.status == RequestStatus.MIGRATING for r in admitted)
    assert all(dec.blocks.num_blocks_of(r.request_id) == 3 for r in admitted)
    assert list(dec.pending) == [reqs[2]] and dec.blocks.num_free_blocks == 4
    # Migrating requests do not decode yet.
    assert dec.schedule(3.5).empty
    for r in admitted:
        migrate(dec, dec_ex, r, kv[r.request_id], 4.0)
        assert r.status == RequestStatus.DECODING and r in dec.running
        assert r.timestamps["migration_start"] == 3.0 and r.timestamps["migration_end"] == 4.0
    with pytest.raises(KeyError):
        dec.finish_migration("a", 4.0)
    plan, _ = step(dec, dec_ex, 5.0)
    assert ids(plan) == ["a", "b"] and [c.start for c in plan.chunks] == [8, 8]
    assert [c.token_ids for c in plan.chunks] == [(100,), (100,)]
    assert [c.output_index for c in plan.chunks] == [1, 1]
    assert dec.admit_migrations(5.0) == []


def test_decode_admission_is_capped_by_seats() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b", "c"])
    dec, dec_ex = decode_side(max_num_seqs=2)
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    assert dec.admit_migrations(3.0) == reqs[:2]
    migrate(dec, dec_ex, reqs[0], kv["a"], 3.0)
    assert dec.admit_migrations(3.0) == []  # a decodes, b migrates: both seats taken


def test_fail_migration_frees_blocks_and_requeues_at_the_front() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b"])
    dec, dec_ex = decode_side(max_num_seqs=1)
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    a, b = reqs
    assert dec.admit_migrations(3.0) == [a]
    assert dec.blocks.num_used_blocks == 3
    assert dec.fail_migration("a", 4.0) is a
    assert a.status == RequestStatus.AWAITING_MIGRATION
    assert list(dec.pending) == [a, b] and dec.blocks.num_used_blocks == 0
    check(dec)
    with pytest.raises(KeyError):
        dec.fail_migration("a", 4.0)
    # Retried first; the first record of migration_start stays.
    assert dec.admit_migrations(5.0) == [a]
    assert a.timestamps["migration_start"] == 3.0
    migrate(dec, dec_ex, a, kv["a"], 6.0)
    now = 7.0
    while not a.finished:
        step(dec, dec_ex, now)
        now += 1
    assert a.output_token_ids == outputs_of(6)
    assert list(dec.pending) == [b]
    assert dec.admit_migrations(now) == [b]
    migrate(dec, dec_ex, b, kv["b"], now)
    drain(dec, dec_ex, now)
    assert b.output_token_ids == outputs_of(6)
    assert_all_free(dec)


def test_can_accept_honours_max_pending_migrations() -> None:
    pre, pre_ex, _ = prefilled(["a", "b", "c"])
    dec, _ = decode_side(max_pending_migrations=2)
    assert dec.can_accept()
    hand_over(pre, pre_ex, dec, "a", 2.0)
    assert dec.can_accept()
    hand_over(pre, pre_ex, dec, "b", 2.0)
    assert not dec.can_accept()
    dec.admit_migrations(3.0)
    assert dec.can_accept()


def test_add_migrating_rejects_a_request_not_prefilled() -> None:
    dec, _ = decode_side()
    with pytest.raises(ValueError, match="not a prefilled request"):
        dec.add_migrating(request("a", 4))
    pre, pre_ex, _ = prefilled(["a"])
    req, _ = hand_over(pre, pre_ex, dec, "a", 2.0)
    with pytest.raises(ValueError, match="in use"):
        dec.add_migrating(req)


def run_decode_side(
    dec: DecodeScheduler, dec_ex: FakeExecutor, kv: dict[str, KV], now: float
) -> float:
    """Admit and migrate whatever fits, step, until the decode side is empty."""
    for _ in range(500):
        for r in dec.admit_migrations(now):
            migrate(dec, dec_ex, r, kv[r.request_id], now)
        if not dec.has_unfinished():
            return now
        plan, _ = step(dec, dec_ex, now)
        assert len(plan.chunks) <= dec.config.max_num_seqs
        now += 1
    raise AssertionError("decode side did not finish")


def test_decode_continuous_batching_lets_new_requests_join() -> None:
    pre = PrefillScheduler(config(), blocks())
    pre_ex = FakeExecutor(pre)
    dec, dec_ex = decode_side()
    pre.add_request(request("a", 4, max_tokens=5))
    step(pre, pre_ex, 1.0)
    a, kv = hand_over(pre, pre_ex, dec, "a", 1.0)
    dec.admit_migrations(1.0)
    migrate(dec, dec_ex, a, kv, 1.0)
    step(dec, dec_ex, 2.0)
    pre.add_request(request("b", 6, max_tokens=3))
    step(pre, pre_ex, 2.0)
    b, kv = hand_over(pre, pre_ex, dec, "b", 2.0)
    dec.admit_migrations(3.0)
    migrate(dec, dec_ex, b, kv, 3.0)
    plan, _ = step(dec, dec_ex, 3.0)
    assert ids(plan) == ["a", "b"] and [c.start for c in plan.chunks] == [5, 6]
    assert [c.output_index for c in plan.chunks] == [2, 1]
    drain(dec, dec_ex, 4.0)
    assert a.output_token_ids == outputs_of(5) and b.output_token_ids == outputs_of(3)
    assert a.timestamps["decode_start"] == 2.0 and b.timestamps["decode_start"] == 3.0
    assert_all_free(dec)
    assert_all_free(pre)


def test_decode_preemption_by_recompute_rebuilds_prompt_and_outputs() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b"], prompt_len=4, max_tokens=8)
    dec, dec_ex = decode_side(num_blocks=5)
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    run_decode_side(dec, dec_ex, kv, 3.0)
    a, b = reqs
    assert a.num_preemptions == 0 and b.num_preemptions == 1
    assert dec.num_preemptions == 1
    (recompute,) = [c for p in dec_ex.plans for c in p.chunks if c.start == 0]
    assert recompute.request_id == "b"
    assert recompute.token_ids == tuple(b.prompt_token_ids + outputs_of(5))
    assert recompute.sampling_params is not None and recompute.output_index == 5
    assert a.output_token_ids == outputs_of(8) and b.output_token_ids == outputs_of(8)
    assert_all_free(dec)
    assert_all_free(pre)


def test_decode_preemption_by_swap() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b"], prompt_len=4, max_tokens=8)
    dec = DecodeScheduler(config(preemption_mode="swap"), blocks(5), swap_blocks=blocks(8))
    dec_ex = FakeExecutor(dec)
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    run_decode_side(dec, dec_ex, kv, 3.0)
    assert sum(len(p.swap_out) for p in dec_ex.plans) == 2
    assert sum(len(p.swap_in) for p in dec_ex.plans) == 2
    assert not [c for p in dec_ex.plans for c in p.chunks if c.start == 0]
    assert all(r.output_token_ids == outputs_of(8) for r in reqs)
    assert_all_free(dec)


def test_decode_swap_in_respects_seats_taken_by_migrations() -> None:
    # Two seats. b is swapped out; once a is gone, c and d are admitted to migrate: b may
    # not come back while they hold both seats.
    pre = PrefillScheduler(config(), blocks())
    pre_ex = FakeExecutor(pre)
    specs = [("a", 4, 12), ("b", 4, 12), ("c", 1, 3), ("d", 1, 3)]
    reqs = {rid: request(rid, n, m) for rid, n, m in specs}
    for r in reqs.values():
        pre.add_request(r)
    step(pre, pre_ex, 1.0)
    dec = DecodeScheduler(
        config(preemption_mode="swap", max_num_seqs=2), blocks(7), swap_blocks=blocks(8)
    )
    dec_ex = FakeExecutor(dec)
    kv = {rid: hand_over(pre, pre_ex, dec, rid, 1.0)[1] for rid in "ab"}
    for r in dec.admit_migrations(2.0):
        migrate(dec, dec_ex, r, kv[r.request_id], 2.0)
    now = 3.0
    while reqs["b"].status != RequestStatus.SWAPPED:
        step(dec, dec_ex, now)
        now += 1
    dec.abort_request("a", now)
    kv |= {rid: hand_over(pre, pre_ex, dec, rid, now)[1] for rid in "cd"}
    admitted = dec.admit_migrations(now)
    assert admitted == [reqs["c"], reqs["d"]]
    plan = dec.schedule(now)
    assert not plan.swap_in and not plan.chunks
    for r in admitted:
        migrate(dec, dec_ex, r, kv[r.request_id], now)
    run_decode_side(dec, dec_ex, kv, now + 1)
    assert [reqs[r].output_token_ids for r in "bcd"] == [outputs_of(12)] + [outputs_of(3)] * 2
    assert_all_free(dec)


# ---- abort -----------------------------------------------------------------------------


def _assert_aborted(sched: Scheduler, req: Request, now: float) -> None:
    assert sched.abort_request(req.request_id, now) is req
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert req.finish_reason == FinishReason.ABORT
    assert req.timestamps["finished"] == now and "decode_end" not in req.timestamps
    assert sched.abort_request(req.request_id, now + 1) is None  # twice: a no-op
    assert req.timestamps["finished"] == now
    assert req.request_id not in sched.requests
    queues: list[object] = [sched.waiting, sched.running, sched.swapped]
    if isinstance(sched, DecodeScheduler):
        queues.append(sched.pending)
    assert all(req not in q for q in queues)  # type: ignore[operator]
    assert not sched.blocks.has(req.request_id)
    if sched.swap_blocks is not None:
        assert not sched.swap_blocks.has(req.request_id)
    check(sched)


def test_abort_waiting() -> None:
    sched = ColocatedScheduler(config(), blocks())
    req = request("a", 4)
    sched.add_request(req)
    _assert_aborted(sched, req, 1.0)
    assert sched.schedule(2.0).empty
    assert_all_free(sched)


@pytest.mark.parametrize("chunked", [False, True])
def test_abort_running(chunked: bool) -> None:
    sched = ColocatedScheduler(config(chunked_prefill=chunked, max_num_batched_tokens=64), blocks())
    ex = FakeExecutor(sched)
    req, other = request("a", 4), request("b", 4)
    sched.add_request(req)
    sched.add_request(other)
    step(sched, ex, 1.0)
    assert sched.blocks.has("a")
    _assert_aborted(sched, req, 2.0)
    drain(sched, ex, 3.0)
    assert other.output_token_ids == outputs_of(4)
    assert_all_free(sched)


def test_abort_a_partly_prefilled_request() -> None:
    sched = ColocatedScheduler(config(chunked_prefill=True, max_num_batched_tokens=4), blocks())
    ex = FakeExecutor(sched)
    req = request("a", 10)
    sched.add_request(req)
    step(sched, ex, 1.0)
    assert req.status == RequestStatus.PREFILLING and req.num_computed_tokens == 4
    _assert_aborted(sched, req, 2.0)
    assert req.output_token_ids == []
    assert_all_free(sched)


def test_abort_swapped() -> None:
    sched = ColocatedScheduler(config(preemption_mode="swap"), blocks(5), swap_blocks=blocks(8))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    now = 1.0
    while b.status != RequestStatus.SWAPPED:
        step(sched, ex, now)
        now += 1
    assert sched.swap_blocks is not None and sched.swap_blocks.has("b")
    _assert_aborted(sched, b, now)
    drain(sched, ex, now + 1)
    assert a.output_token_ids == outputs_of(8)
    assert_all_free(sched)


def test_abort_preempted_for_recompute() -> None:
    sched = ColocatedScheduler(config(), blocks(5))
    ex = FakeExecutor(sched)
    a, b = _two_growing(sched)
    now = 1.0
    while not b.num_preemptions:
        step(sched, ex, now)
        now += 1
    _assert_aborted(sched, b, now)
    drain(sched, ex, now + 1)
    assert_all_free(sched)


def test_abort_awaiting_migration() -> None:
    sched, _, (a, b) = prefilled(["a", "b"])
    _assert_aborted(sched, a, 2.0)
    assert sched.awaiting_migration() == [b]
    with pytest.raises(KeyError):
        sched.release_migrated("a", 3.0)
    sched.release_migrated("b", 3.0)
    assert_all_free(sched)


def test_abort_pending_and_migrating_and_decoding() -> None:
    pre, pre_ex, reqs = prefilled(["a", "b", "c"])
    dec, dec_ex = decode_side(max_num_seqs=2)
    kv = {r.request_id: hand_over(pre, pre_ex, dec, r.request_id, 2.0)[1] for r in reqs}
    a, b, c = reqs
    dec.admit_migrations(3.0)
    assert (a.status, b.status, c.status) == (
        RequestStatus.MIGRATING,
        RequestStatus.MIGRATING,
        RequestStatus.AWAITING_MIGRATION,
    )
    _assert_aborted(dec, c, 4.0)  # pending
    _assert_aborted(dec, b, 4.0)  # migrating
    with pytest.raises(KeyError):
        dec.finish_migration("b", 5.0)
    migrate(dec, dec_ex, a, kv["a"], 5.0)
    step(dec, dec_ex, 6.0)
    _assert_aborted(dec, a, 7.0)  # decoding
    assert a.output_token_ids == outputs_of(2)
    assert not dec.has_unfinished()
    assert_all_free(dec)


def test_abort_between_schedule_and_update_is_skipped() -> None:
    sched = ColocatedScheduler(config(), blocks())
    ex = FakeExecutor(sched)
    a, b = request("a", 4), request("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule(1.0)
    result = ex.execute(plan)
    sched.abort_request("a", 1.5)
    outputs = sched.update(plan, result, 2.0)
    assert [o.request for o in outputs] == [b]
    assert a.output_token_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    # Once more while decoding.
    plan = sched.schedule(3.0)
    result = ex.execute(plan)
    sched.abort_request("b", 3.5)
    assert sched.update(plan, result, 4.0) == []
    assert b.output_token_ids == [100] and b.num_computed_tokens == 4
    assert_all_free(sched)


def test_abort_unknown_request_is_a_noop() -> None:
    sched = ColocatedScheduler(config(), blocks())
    assert sched.abort_request("nobody", 1.0) is None


# ---- the whole disaggregated flow equals the colocated one -----------------------------------


def mixed_tokens(context: tuple[int, ...], index: int) -> int:
    """A hash of the whole context: any difference in what a request has seen shows."""
    h = 0
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % 997 + 3


def test_disaggregated_flow_equals_colocated() -> None:
    specs = [("a", 5, 7), ("b", 12, 3), ("c", 1, 9), ("d", 8, 1), ("e", 3, 5), ("f", 6, 6)]

    def make() -> list[Request]:
        return [request(rid, n, m) for rid, n, m in specs]

    colo = ColocatedScheduler(config(), blocks(12))
    colo_ex = FakeExecutor(colo, mixed_tokens)
    expected = make()
    for r in expected:
        colo.add_request(r)
    drain(colo, colo_ex)
    assert_all_free(colo)

    pre = PrefillScheduler(config(max_num_seqs=4), blocks(12))
    pre_ex = FakeExecutor(pre, mixed_tokens)
    dec = DecodeScheduler(config(), blocks(8))
    dec_ex = FakeExecutor(dec, mixed_tokens)
    got = make()
    for r in got:
        pre.add_request(r)
    kv: dict[str, KV] = {}
    now = 1.0
    for _ in range(200):
        if not (pre.has_unfinished() or dec.has_unfinished()):
            break
        step(pre, pre_ex, now)
        for r in pre.awaiting_migration():
            assert r.num_output_tokens == 1 and pre.blocks.has(r.request_id)
            kv[r.request_id] = hand_over(pre, pre_ex, dec, r.request_id, now)[1]
        for r in dec.admit_migrations(now):
            migrate(dec, dec_ex, r, kv[r.request_id], now)
        step(dec, dec_ex, now)
        now += 1
    assert not pre.has_unfinished() and not dec.has_unfinished()
    assert_all_free(pre)
    assert_all_free(dec)
    assert dec.num_preemptions > 0  # the decode side's pool is tight on purpose
    for e, g in zip(expected, got, strict=True):
        assert g.output_token_ids == e.output_token_ids
        assert len(g.output_token_ids) == g.sampling_params.max_tokens
        assert g.status == e.status == RequestStatus.FINISHED_LENGTH
        if g.sampling_params.max_tokens > 1:
            t = g.timestamps
            assert t["prefill_end"] <= t["migration_start"] <= t["migration_end"]
            assert t["migration_end"] <= t["decode_start"] <= t["decode_end"] == t["finished"]
        else:
            assert "migration_start" not in g.timestamps


# ---- random workloads ------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One request of a random workload; steps count scheduler steps."""

    step: int
    prompt_len: int
    max_tokens: int
    abort_after: int | None
    """Steps after arrival at which the client aborts (None: never)."""
    abort_mid_step: bool
    """Abort between schedule and update rather than before schedule."""

    def expected_outputs(self, max_model_len: int) -> int:
        return max(1, min(self.max_tokens, max_model_len - self.prompt_len))


@st.composite
def arrivals(draw: st.DrawFn, max_model_len: int) -> list[Arrival]:
    return draw(
        st.lists(
            st.builds(
                Arrival,
                step=st.integers(0, 8),
                prompt_len=st.integers(1, min(20, max_model_len)),
                max_tokens=st.integers(1, 12),
                abort_after=st.none() | st.none() | st.integers(0, 15),
                abort_mid_step=st.booleans(),
            ),
            min_size=2,
            max_size=8,
        )
    )


def pool_size(draw: st.DrawFn, work: list[Arrival], max_model_len: int, bs: int, wm: float) -> int:
    """A small pool that still fits every request's peak above the watermark."""
    peak = max(min(a.prompt_len + a.max_tokens, max_model_len) for a in work)
    need = -(-peak // bs)
    n = need + draw(st.integers(0, 3))
    while need > n - int(wm * n):
        n += 1
    return n


@dataclass
class Workload:
    """Adds arrivals and aborts as the steps come, and checks the outcome."""

    work: list[Arrival]
    max_model_len: int
    reqs: dict[str, Request] = field(default_factory=dict)

    def arrive(self, step_no: int, now: float) -> list[Request]:
        new = []
        for i, a in enumerate(self.work):
            if a.step == step_no:
                req = request(f"r{i}", a.prompt_len, a.max_tokens, arrival=now)
                self.reqs[req.request_id] = req
                new.append(req)
        return new

    def aborts(self, step_no: int, mid_step: bool) -> list[str]:
        return [
            f"r{i}"
            for i, a in enumerate(self.work)
            if a.abort_after is not None
            and a.step + a.abort_after == step_no
            and a.abort_mid_step == mid_step
        ]

    def all_arrived(self, step_no: int) -> bool:
        return all(a.step < step_no for a in self.work)

    def check_outcome(self, final: dict[str, Request]) -> None:
        """`final`: the request object that finished (decode side's copy when migrated)."""
        for i, a in enumerate(self.work):
            req = final[f"r{i}"]
            assert req.finished
            n = a.expected_outputs(self.max_model_len)
            if a.abort_after is None:
                assert req.status == RequestStatus.FINISHED_LENGTH
                assert req.output_token_ids == outputs_of(n)
            else:
                assert req.output_token_ids == outputs_of(req.num_output_tokens)
                assert req.num_output_tokens <= n


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    cfg = sched.config
    assert len(plan.chunks) <= cfg.max_num_seqs
    assert not (plan.swap_out and plan.swap_in)
    if cfg.chunked_prefill:
        assert plan.num_tokens <= cfg.max_num_batched_tokens
        return
    # Without chunking a chunk is a whole prompt (or recompute), or one decode token.
    assert all(c.start == 0 or c.num_tokens == 1 for c in plan.chunks)
    assert all(c.sampling_params is not None for c in plan.chunks)
    prompts = [c for c in plan.chunks if c.start == 0]
    assert sum(c.num_tokens for c in prompts) <= cfg.max_num_batched_tokens
    if isinstance(sched, ColocatedScheduler) and prompts:
        assert len(prompts) == len(plan.chunks)  # prefill first: prompts run alone


@st.composite
def colocated_setups(draw: st.DrawFn) -> tuple[ColocatedScheduler, Workload]:
    chunked = draw(st.booleans())
    swap = draw(st.booleans())
    bs = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(8, 40))
    work = draw(arrivals(max_model_len))
    budget = draw(st.integers(1, 24)) if chunked else max_model_len + draw(st.integers(0, 8))
    wm = draw(st.sampled_from([0.0, 0.1, 0.25]))
    cfg = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        chunked_prefill=chunked,
        preemption_mode="swap" if swap else "recompute",  # type: ignore[arg-type]
    )
    device = BlockManager(pool_size(draw, work, max_model_len, bs, wm), bs, wm)
    host = BlockManager(draw(st.integers(1, 2 * device.num_blocks)), bs) if swap else None
    return ColocatedScheduler(cfg, device, host), Workload(work, max_model_len)


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(colocated_setups())
def test_random_colocated_workloads_finish_and_free_everything(
    setup: tuple[ColocatedScheduler, Workload],
) -> None:
    sched, load = setup
    ex = FakeExecutor(sched)
    now = 0.0
    for step_no in range(3000):
        for req in load.arrive(step_no, now):
            sched.add_request(req)
        for rid in load.aborts(step_no, mid_step=False):
            sched.abort_request(rid, now)
        if load.all_arrived(step_no) and not sched.has_unfinished():
            break
        plan = sched.schedule(now)
        check_plan(sched, plan)
        result = ex.execute(plan)
        for rid in load.aborts(step_no, mid_step=True):
            sched.abort_request(rid, now)
        sched.update(plan, result, now)
        check(sched)
        now += 1.0
    else:
        raise AssertionError(f"no progress: {sched.requests}")
    assert_all_free(sched)
    assert not (sched.waiting or sched.running or sched.swapped)
    load.check_outcome(load.reqs)
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"swapped: {any(p.swap_out for p in ex.plans)}")


@st.composite
def disaggregated_setups(
    draw: st.DrawFn,
) -> tuple[PrefillScheduler, DecodeScheduler, Workload]:
    bs = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 40))
    work = draw(arrivals(max_model_len))
    wm = draw(st.sampled_from([0.0, 0.1]))
    pre_cfg = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=max_model_len + draw(st.integers(0, 8)),
        max_model_len=max_model_len,
        max_migration_hold=draw(st.sampled_from([0.3, 0.6, 1.0])),
    )
    swap = draw(st.booleans())
    dec_cfg = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=max_model_len,
        max_model_len=max_model_len,
        preemption_mode="swap" if swap else "recompute",  # type: ignore[arg-type]
        max_pending_migrations=draw(st.integers(1, 4)),
    )
    pre_blocks = BlockManager(pool_size(draw, work, max_model_len, bs, wm), bs, wm)
    dec_blocks = BlockManager(pool_size(draw, work, max_model_len, bs, wm), bs, wm)
    host = BlockManager(draw(st.integers(1, 2 * dec_blocks.num_blocks)), bs) if swap else None
    pre = PrefillScheduler(pre_cfg, pre_blocks)
    return pre, DecodeScheduler(dec_cfg, dec_blocks, host), Workload(work, max_model_len)


@FAST
@given(disaggregated_setups(), st.randoms(use_true_random=False))
def test_random_disaggregated_workloads_finish_and_free_everything(
    setup: tuple[PrefillScheduler, DecodeScheduler, Workload], rnd: random.Random
) -> None:
    """The prefill side keeps a request's blocks until the decode side has pulled the KV
    (the decode side works on its own copy of the request, as across processes);
    migrations are delayed, fail and are retried at random."""
    pre, dec, load = setup
    pre_ex, dec_ex = FakeExecutor(pre), FakeExecutor(dec)
    final: dict[str, Request] = {}
    handed: dict[str, Request] = {}

    def abort(rid: str, now: float) -> None:
        pre.abort_request(rid, now)
        dec.abort_request(rid, now)
        handed.pop(rid, None)

    held_back = False
    now = 0.0
    for step_no in range(3000):
        for req in load.arrive(step_no, now):
            pre.add_request(req)
            final[req.request_id] = req
        for rid in load.aborts(step_no, mid_step=False):
            abort(rid, now)
        if load.all_arrived(step_no) and not (pre.has_unfinished() or dec.has_unfinished()):
            break
        # The prefill step.
        held_back |= bool(pre.waiting) and pre.migration_hold_exceeded()
        plan = pre.schedule(now)
        check_plan(pre, plan)
        result = pre_ex.execute(plan)
        mid = load.aborts(step_no, mid_step=True)
        for rid in mid:
            abort(rid, now)
        pre.update(plan, result, now)
        # The router hands prefilled requests over while the decode side accepts them.
        for req in pre.awaiting_migration():
            if req.request_id not in handed and dec.can_accept() and rnd.random() < 0.7:
                copy = deepcopy(req)
                dec.add_migrating(copy)
                handed[req.request_id] = final[req.request_id] = copy
        # Migrations in flight finish, fail or take another step.
        for rid, copy in list(handed.items()):
            if copy.status != RequestStatus.MIGRATING:
                continue
            x = rnd.random()
            if x < 0.15:
                dec.fail_migration(rid, now)
            elif x < 0.85:
                src = pre.blocks.block_table(rid)
                dst = dec.blocks.block_table(rid)
                for p in range(copy.num_computed_tokens):
                    slot = pre_ex.read(src, p)
                    assert slot == (rid, p, copy.all_token_ids[p])
                    dec_ex.write(dst, p, slot)
                dec.finish_migration(rid, now)
                pre.release_migrated(rid, now)
                del handed[rid]
        dec.admit_migrations(now)
        # The decode step.
        plan = dec.schedule(now)
        check_plan(dec, plan)
        result = dec_ex.execute(plan)
        for rid in mid:
            abort(rid, now)
        dec.update(plan, result, now)
        check(pre)
        check(dec)
        now += 1.0
    else:
        raise AssertionError(f"no progress: {pre.requests} {dec.requests}")
    assert_all_free(pre)
    assert_all_free(dec)
    assert not handed and not dec.pending
    load.check_outcome(final)
    event(f"decode preempted: {dec.num_preemptions > 0}")
    event(f"prefill held back: {held_back}")
