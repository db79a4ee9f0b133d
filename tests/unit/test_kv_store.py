"""The KV store's directory (core/kv_store.py): a hypothesis state machine runs
requests that share prefixes through prefill chunks and decode steps, some of whose steps
die after writing and before their commit, with a store too small for all of them, and
checks after every operation that slots are in exactly one state, and that every slot a
request would resume from holds exactly that request's KV (modelled: the KV at a position
is the token prefix up to it), so that no slot is shared wrongly, overwritten while held,
or leaked once every request has ended. And the pool's copies (runtime/kv_store.py)
on real tensors."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from distserve.core import Request, SamplingParams, StepPlan
from distserve.core.kv_store import KVStore
from distserve.core.plan import ScheduledChunk
from distserve.runtime.kv_store import write_to_store

BS = 4
SLOTS = 24
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9], [7] * 13]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = KVStore(SLOTS, BS, "model")
        self.content: list[list[tuple[int, ...] | None]] = [[None] * BS for _ in range(SLOTS)]
        """What each slot holds, per offset: the token prefix whose KV it is."""
        self.live: dict[str, Request] = {}
        self.computed: dict[str, int] = {}
        self.ids = 0

    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))), extra=st.lists(st.integers(0, 3), max_size=6)
    )
    def arrive(self, prefix: int, extra: list[int]) -> None:
        rid = f"r{self.ids}"
        self.ids += 1
        self.live[rid] = Request(rid, PREFIXES[prefix] + extra, SamplingParams(max_tokens=64), 0.0)
        self.computed[rid] = 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), lands=st.booleans(), chunk=st.integers(1, 9))
    def step(self, data: st.DataObject, lands: bool, chunk: int) -> None:
        """One step of a batch of one or two requests (a batched prefill of two prompts
        with one prefix names the same blocks twice before either commits)."""
        rids = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=2,
                                  unique=True))  # fmt: skip
        chunks = []
        for rid in rids:
            req, start = self.live[rid], self.computed[rid]
            n = min(chunk, req.num_tokens - start) if start < req.num_prompt_tokens else 1
            if start + n > req.num_tokens:  # a decode step needs its newest token sampled
                continue
            k = int(rid[1:])  # device block of request k's block i: 1000 * k + i
            table = tuple(1000 * k + i for i in range((start + n + BS - 1) // BS))
            chunks.append(ScheduledChunk(rid, tuple(req.token_ids(start, start + n)), start,
                                         table, None))  # fmt: skip
        plan, pending = self.store.plan(StepPlan(0, tuple(chunks)), self.live)
        for block, slot, first, end in plan.store_writes:  # the worker's copies
            k, i = divmod(block, 1000)
            tokens = self.live[f"r{k}"].all_token_ids
            for off in range(first, end):
                self.content[slot][off] = tuple(tokens[: i * BS + off + 1])
        if not lands:  # the instance died after its worker wrote: never committed
            return
        self.store.commit(pending)
        for c in chunks:
            req = self.live[c.request_id]
            self.computed[c.request_id] = c.context_len
            if c.context_len == req.num_tokens:
                req.output_token_ids.append(c.context_len % 5)  # the sampled token

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[rid]
        self.store.release(rid)

    @invariant()
    def consistent(self) -> None:
        self.store.check()
        for rid, req in self.live.items():
            e = self.store.entries.get(rid)
            if e is None or e.broken:
                continue
            slots = self.store.resume_slots(rid, e.valid + 1)
            assert slots is not None
            tokens = req.all_token_ids
            for pos in range(e.valid):
                got = self.content[slots[pos // BS]][pos % BS]
                assert got == tuple(tokens[: pos + 1]), (rid, pos, got)

    def teardown(self) -> None:
        for rid in list(self.live):
            self.store.release(rid)
        self.store.check()
        assert self.store.num_free_slots == SLOTS  # every slot free or cached: none leaked


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def test_a_request_resumes_only_with_all_but_its_last_token_stored() -> None:
    store = KVStore(8, BS, "model")
    req = Request("a", list(range(6)), SamplingParams(max_tokens=8), 0.0)
    chunk = ScheduledChunk("a", tuple(range(6)), 0, (0, 1), None)
    plan, pending = store.plan(StepPlan(0, (chunk,)), {"a": req})
    assert plan.store_writes == ((0, 0, 0, 4), (1, 1, 0, 2))
    assert store.resume_slots("a", 7) is None  # not committed yet
    store.commit(pending)
    req.output_token_ids.append(9)
    assert store.resume_slots("a", 7) == [0, 1]
    assert store.resume_slots("a", 8) is None  # the step for token 6 has not run
    # a second request with the same first block shares its slot and writes only the rest
    other = Request("b", list(range(4)) + [7, 7], SamplingParams(max_tokens=8), 0.0)
    chunk = ScheduledChunk("b", tuple(other.prompt_token_ids), 0, (5, 6), None)
    plan, _ = store.plan(StepPlan(0, (chunk,)), {"b": other})
    assert plan.store_writes == ((6, 2, 0, 2),)
    assert store.entries["b"].slots == [0, 2]
    store.release("a")
    store.release("b")
    store.check()
    assert store.num_cached_slots == 1  # the full shared block stays as cache


def test_a_full_store_stops_writing_a_request_and_it_is_not_resumable() -> None:
    store = KVStore(2, BS, "model")
    req = Request("a", list(range(12)), SamplingParams(max_tokens=8), 0.0)
    chunk = ScheduledChunk("a", tuple(range(12)), 0, (0, 1, 2), None)
    plan, pending = store.plan(StepPlan(0, (chunk,)), {"a": req})
    store.commit(pending)
    assert store.entries["a"].broken and store.stats.broken == 1
    assert store.resume_slots("a", 13) is None
    store.release("a")
    store.check()
    assert store.num_free_slots == 2


def test_pool_copies_whole_and_partial_blocks() -> None:
    rows, blocks, head_dim = 6, 5, 3
    cache = torch.arange(rows * blocks * BS * head_dim, dtype=torch.float32)
    cache = cache.view(rows, blocks, BS * head_dim)
    store = torch.zeros(rows, 4, BS * head_dim)
    n = write_to_store(cache, store, ((3, 0, 0, BS), (1, 2, 1, 3)), BS)
    assert torch.equal(store[:, 0], cache[:, 3])
    assert torch.equal(store[:, 2, head_dim : 3 * head_dim], cache[:, 1, head_dim : 3 * head_dim])
    assert not store[:, 2, :head_dim].any() and not store[:, 2, 3 * head_dim :].any()
    assert not store[:, 1].any() and not store[:, 3].any()
    assert n == (BS + 2) * head_dim * rows * 4
