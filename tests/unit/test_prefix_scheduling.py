"""The schedulers with prefix caching, driven by hand through the step contract.

The fake executor's KV cache holds, at position p, the KV "of" the tokens [0, p] (the
whole prefix, as a real model's KV depends on it), and it samples from the whole context.
Before each chunk it checks that every cached position reads back as the KV of the
request's own prefix, and that the chunk writes into no block another request holds.
So a hit on the wrong blocks, a block evicted while in use, or a shared block written
shows up, and outputs with hits must equal a cold run's token for token.
"""

from __future__ import annotations

import random
from copy import deepcopy
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distserve.core import (
    BlockManager,
    ColocatedScheduler,
    DecodeScheduler,
    PrefillScheduler,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    StepPlan,
    StepResult,
)

Slot = tuple[int, tuple[int, ...]]


def model(context: tuple[int, ...]) -> int:
    """The fake model: a token from a hash of the whole context."""
    h = 0
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % 97 + 3


@dataclass
class KVExecutor:
    sched: Scheduler
    device: dict[int, dict[int, Slot]] = field(default_factory=dict)
    host: dict[int, dict[int, Slot]] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for dev, hst in plan.swap_out:
            self.host[hst] = dict(self.device.get(dev, {}))
        for hst, dev in plan.swap_in:
            self.device[dev] = dict(self.host.get(hst, {}))
        sampled = {}
        for c in plan.chunks:
            req = self.sched.requests[c.request_id]
            tokens = req.all_token_ids
            assert c.start == req.num_computed_tokens and c.num_tokens >= 1
            assert c.token_ids == tuple(tokens[c.start : c.context_len])
            assert c.block_table == tuple(self.sched.blocks.block_table(req.request_id))
            for p in range(c.start):
                assert self.read(c.block_table, p) == (p, tuple(tokens[: p + 1])), p
            for p in range(c.start, c.context_len):
                b = c.block_table[p // self.sched.blocks.block_size]
                assert self.sched.blocks._ref[b] == 1, f"writes into shared block {b}"
                self.write(c.block_table, p, (p, tuple(tokens[: p + 1])))
            if c.sampling_params is not None:
                sampled[c.request_id] = model(tuple(tokens[: c.context_len]))
        return StepResult(sampled=sampled)

    def read(self, table: tuple[int, ...] | list[int], p: int) -> Slot | None:
        bs = self.sched.blocks.block_size
        return self.device.get(table[p // bs], {}).get(p % bs)

    def write(self, table: tuple[int, ...] | list[int], p: int, slot: Slot) -> None:
        bs = self.sched.blocks.block_size
        self.device.setdefault(table[p // bs], {})[p % bs] = slot


def cfg(**kw: object) -> SchedulerConfig:
    kw.setdefault("max_model_len", 64)
    kw.setdefault("max_num_batched_tokens", 64)
    return SchedulerConfig(**kw)  # type: ignore[arg-type]


def pool(n: int = 64, bs: int = 4, caching: bool = True) -> BlockManager:
    return BlockManager(n, bs, prefix_caching=caching, cache_key="m")


def req(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


def step(sched: Scheduler, ex: KVExecutor, now: float = 1.0) -> StepPlan:
    plan = sched.schedule(now)
    sched.update(plan, ex.execute(plan), now)
    sched.blocks.check_integrity()
    if sched.swap_blocks is not None:
        sched.swap_blocks.check_integrity()
    return plan


def drain(sched: Scheduler, ex: KVExecutor) -> None:
    for _ in range(500):
        if not sched.has_unfinished():
            return
        step(sched, ex)
    raise AssertionError("did not finish")


def cold(prompts: list[list[int]], max_tokens: int = 4) -> list[list[int]]:
    """Outputs of the same prompts, one at a time, without prefix caching."""
    outs = []
    for i, p in enumerate(prompts):
        sched = ColocatedScheduler(cfg(), pool(caching=False))
        r = req(f"c{i}", p, max_tokens)
        sched.add_request(r)
        drain(sched, KVExecutor(sched))
        outs.append(r.output_token_ids)
    return outs


BASE = list(range(10, 30))


def test_a_shared_prefix_is_computed_once_and_outputs_match_a_cold_run() -> None:
    sched = ColocatedScheduler(cfg(), pool())
    ex = KVExecutor(sched)
    a, b = req("a", BASE), req("b", [*BASE[:16], 7, 7, 7])
    sched.add_request(a)
    step(sched, ex)  # a's prompt is computed and its four full blocks named
    sched.add_request(b)
    plan = step(sched, ex)
    (chunk,) = [c for c in plan.chunks if c.request_id == "b"]
    assert (chunk.start, chunk.num_tokens) == (16, 3)
    assert sched.blocks.block_table("b")[:4] == sched.blocks.block_table("a")[:4]
    assert b.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert (sched.num_prompt_tokens_admitted, sched.num_prompt_tokens_cached) == (39, 16)
    drain(sched, ex)
    assert [a.output_token_ids, b.output_token_ids] == cold(
        [a.prompt_token_ids, b.prompt_token_ids]
    )
    assert sched.blocks.num_used_blocks == 0 and sched.blocks.num_cached_blocks > 0


def test_a_repeated_prompt_computes_only_its_last_block_after_the_first_finished() -> None:
    sched = ColocatedScheduler(cfg(), pool())
    ex = KVExecutor(sched)
    first = req("a", BASE[:16])
    sched.add_request(first)
    drain(sched, ex)
    again = req("b", BASE[:16])
    sched.add_request(again)
    plan = step(sched, ex)
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(12, 4)]  # last token's logits
    drain(sched, ex)
    assert again.num_cached_tokens == 12
    assert again.output_token_ids == first.output_token_ids


def test_hits_leave_the_token_budget_to_uncomputed_tokens() -> None:
    sched = PrefillScheduler(cfg(max_num_batched_tokens=64), pool())
    ex = KVExecutor(sched)
    sched.add_request(req("a", BASE))
    step(sched, ex)
    for rid in "bcde":  # 20 tokens each: 80 > 64, but with 16 cached each computes 4
        sched.add_request(req(rid, [*BASE[:16], ord(rid), 1, 2, 3]))
    plan = step(sched, ex)
    assert [c.request_id for c in plan.chunks] == list("bcde") and plan.num_tokens == 16


def test_recompute_preemption_takes_its_own_blocks_back_from_the_cache() -> None:
    # 9 blocks of 4: three requests of 12 + outputs run out; the victim's named blocks
    # are parked when it is preempted, and its re-admission hits them.
    sched = ColocatedScheduler(cfg(max_num_seqs=3), pool(9))
    ex = KVExecutor(sched)
    prompts = [[i] * 12 for i in (1, 2, 3)]
    reqs = [req(f"r{i}", p, 12) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    drain(sched, ex)
    assert sched.num_preemptions > 0
    restarts = [c for p in ex.plans for c in p.chunks if c.start > 0 and c.num_tokens > 1]
    assert restarts, "a re-admitted victim should start past its cached prefix"
    assert [r.output_token_ids for r in reqs] == cold(prompts, 12)
    assert all(r.num_cached_tokens == 0 for r in reqs)  # usage counts the first prefill
    assert sched.blocks.num_used_blocks == 0


def test_swapping_out_a_request_leaves_the_prefix_it_shares_in_place() -> None:
    sched = ColocatedScheduler(
        cfg(max_num_seqs=2, preemption_mode="swap"), pool(9), BlockManager(16, 4)
    )
    ex = KVExecutor(sched)
    a = req("a", BASE[:16], 12)
    sched.add_request(a)
    step(sched, ex)
    b = req("b", [*BASE[:16], 5], 12)
    sched.add_request(b)
    drain(sched, ex)
    assert any(p.swap_out for p in ex.plans) and any(p.swap_in for p in ex.plans)
    assert b.num_cached_tokens == 16
    assert [a.output_token_ids, b.output_token_ids] == cold(
        [a.prompt_token_ids, b.prompt_token_ids], 12
    )
    assert sched.blocks.num_used_blocks == 0 and sched.swap_blocks is not None
    assert sched.swap_blocks.num_used_blocks == 0


def test_chunked_prefill_starts_its_first_chunk_after_the_cached_prefix() -> None:
    sched = ColocatedScheduler(cfg(chunked_prefill=True, max_num_batched_tokens=6), pool())
    ex = KVExecutor(sched)
    a = req("a", BASE)
    sched.add_request(a)
    drain(sched, ex)
    b = req("b", [*BASE[:16], 1, 2, 3, 4, 5, 6, 7, 8])
    sched.add_request(b)
    plan = step(sched, ex)
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(16, 6)]
    drain(sched, ex)
    assert b.output_token_ids == cold([b.prompt_token_ids])[0]


def migrate(src: KVExecutor, dst: KVExecutor, dec: DecodeScheduler, r: Request) -> int:
    """Copy what the decode side lacks: the source's blocks past its local hits."""
    skip = dec.num_local_blocks(r.request_id)
    src_table = src.sched.blocks.block_table(r.request_id)
    dst_table = dec.blocks.block_table(r.request_id)
    for i in range(skip, len(src_table)):
        dst.device[dst_table[i]] = dict(src.device.get(src_table[i], {}))
    return skip


def disagg(
    decode_blocks: int = 64,
) -> tuple[PrefillScheduler, KVExecutor, DecodeScheduler, KVExecutor]:
    pre = PrefillScheduler(cfg(), pool())
    dec = DecodeScheduler(cfg(), pool(decode_blocks))
    return pre, KVExecutor(pre), dec, KVExecutor(dec)


def hand_over(dec: DecodeScheduler, r: Request) -> Request:
    copy = deepcopy(r)
    dec.add_migrating(copy)
    (admitted,) = dec.admit_migrations(1.0)
    assert admitted is copy
    return copy


def test_a_migration_moves_only_the_blocks_the_decode_side_lacks() -> None:
    pre, pre_ex, dec, dec_ex = disagg()
    finals = []
    for rid, prompt in (("a", BASE), ("b", [*BASE[:16], 9, 9])):
        r = req(rid, prompt, 6)
        pre.add_request(r)
        step(pre, pre_ex)
        copy = hand_over(dec, r)
        skipped = migrate(pre_ex, dec_ex, dec, copy)
        dec.finish_migration(rid, 1.0)
        pre.release_migrated(rid, 1.0)
        drain(dec, dec_ex)
        finals.append((skipped, copy))
    (skip_a, a), (skip_b, b) = finals
    assert skip_a == 0 and skip_b == 4  # a's migrated blocks were named on the decode side
    assert b.num_cached_tokens == 16  # the prefill side hit them too
    assert [a.output_token_ids, b.output_token_ids] == cold(
        [a.prompt_token_ids, b.prompt_token_ids], 6
    )
    assert pre.blocks.num_used_blocks == dec.blocks.num_used_blocks == 0


def test_a_failed_pull_names_nothing_and_keeps_the_local_prefix_cached() -> None:
    pre, pre_ex, dec, dec_ex = disagg()
    a = req("a", BASE, 2)
    pre.add_request(a)
    step(pre, pre_ex)
    copy = hand_over(dec, a)
    migrate(pre_ex, dec_ex, dec, copy)
    dec.finish_migration("a", 1.0)
    pre.release_migrated("a", 1.0)
    drain(dec, dec_ex)
    parked = dec.blocks.num_cached_blocks
    b = req("b", [*BASE[:16], 4, 4, 4, 4, 4], 2)  # its fifth block is full, fresh
    pre.add_request(b)
    step(pre, pre_ex)
    copy = hand_over(dec, b)
    assert dec.num_local_blocks("b") == 4
    dec.fail_migration("b", 1.0)  # nothing was copied: the fresh block holds garbage
    dec.blocks.check_integrity()
    assert dec.blocks.num_cached_blocks == parked and dec.num_local_blocks("b") == 0
    (again,) = dec.admit_migrations(1.0)
    assert dec.num_local_blocks("b") == 4
    migrate(pre_ex, dec_ex, dec, again)
    dec.finish_migration("b", 1.0)
    pre.release_migrated("b", 1.0)
    drain(dec, dec_ex)
    assert again.output_token_ids == cold([b.prompt_token_ids], 2)[0]


# ---- random workloads with shared prefixes ------------------------------------------


@st.composite
def shared_prompts(draw: st.DrawFn, max_len: int) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt, max_tokens): prefixes of two texts plus random tails."""
    texts = [[(7 * i + k) % 5 for i in range(max_len)] for k in (0, 1)]
    out = []
    for _ in range(draw(st.integers(2, 8))):
        text = texts[draw(st.integers(0, 1))]
        tail = draw(st.lists(st.integers(0, 4), max_size=3))
        prompt = (text[: draw(st.integers(0, max_len - 4))] + tail) or [1]
        out.append((draw(st.integers(0, 6)), prompt, draw(st.integers(1, 8))))
    return out


SHARED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SHARED
@given(
    shared_prompts(24),
    st.sampled_from([1, 2, 4]),
    st.booleans(),
    st.sampled_from(["recompute", "swap"]),
    st.integers(0, 4),
)
def test_random_shared_prefix_workloads_match_a_cold_run_and_leak_nothing(
    work: list[tuple[int, list[int], int]], bs: int, chunked: bool, mode: str, slack: int
) -> None:
    need = max(-(-(len(p) + m) // bs) for _, p, m in work)
    sched = ColocatedScheduler(
        cfg(
            max_model_len=32,
            max_num_batched_tokens=5 if chunked else 32,
            chunked_prefill=chunked,
            max_num_seqs=4,
            preemption_mode=mode,
        ),
        pool(need + slack, bs),
        BlockManager(4 * (need + slack), bs) if mode == "swap" else None,
    )
    ex = KVExecutor(sched)
    reqs = {}
    for now in range(2000):
        for i, (at, prompt, m) in enumerate(work):
            if at == now:
                reqs[i] = req(f"r{i}", prompt, m)
                sched.add_request(reqs[i])
        if now > 6 and not sched.has_unfinished():
            break
        step(sched, ex, float(now))
    else:
        raise AssertionError("no progress")
    assert sched.blocks.num_used_blocks == 0
    for i, (_, prompt, m) in enumerate(work):
        assert reqs[i].output_token_ids == cold([prompt], m)[0]
    event(f"hits: {sched.num_prompt_tokens_cached > 0}")
    event(f"preempted: {sched.num_preemptions > 0}")


@SHARED
@given(shared_prompts(24), st.sampled_from([1, 2, 4]), st.randoms(use_true_random=False))
def test_random_disaggregated_shared_prefixes_with_failed_pulls(
    work: list[tuple[int, list[int], int]], bs: int, rnd: random.Random
) -> None:
    need = max(-(-(len(p) + m) // bs) for _, p, m in work)
    pre = PrefillScheduler(cfg(max_model_len=32, max_num_batched_tokens=32), pool(need + 2, bs))
    dec = DecodeScheduler(cfg(max_model_len=32, max_num_seqs=3), pool(need + 1, bs))
    pre_ex, dec_ex = KVExecutor(pre), KVExecutor(dec)
    final: dict[int, Request] = {}
    skipped = 0
    for now in range(3000):
        for i, (at, prompt, m) in enumerate(work):
            if at == now:
                final[i] = req(f"r{i}", prompt, m)
                pre.add_request(final[i])
        if now > 6 and not (pre.has_unfinished() or dec.has_unfinished()):
            break
        step(pre, pre_ex, float(now))
        for r in pre.awaiting_migration():
            i = int(r.request_id[1:])
            if final[i] is r and dec.can_accept():
                final[i] = deepcopy(r)
                dec.add_migrating(final[i])
        for r in dec.admit_migrations(float(now)):
            if rnd.random() < 0.2:
                dec.fail_migration(r.request_id, float(now))
                continue
            skipped += migrate(pre_ex, dec_ex, dec, r)
            dec.finish_migration(r.request_id, float(now))
            pre.release_migrated(r.request_id, float(now))
        step(dec, dec_ex, float(now))
    else:
        raise AssertionError("no progress")
    assert pre.blocks.num_used_blocks == dec.blocks.num_used_blocks == 0
    for i, (_, prompt, m) in enumerate(work):
        assert final[i].output_token_ids == cold([prompt], m)[0]
    event(f"decode-side hits: {skipped > 0}")
    event(f"prefill-side hits: {pre.num_prompt_tokens_cached > 0}")
