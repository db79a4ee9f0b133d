"""The KV store's directory (core/kv_store.py): a hypothesis state machine runs
requests that share prefixes through prefill chunks and decode steps, some of whose steps
die after writing and before their commit, with a store too small for all of them, and
checks after every operation that slots are in exactly one state, and that every slot a
request would resume from holds exactly that request's KV (modelled: the KV at a position
is the token prefix up to it), so that no slot is shared wrongly, overwritten while held,
or leaked once every request has ended; first prefills load the prefix the store holds and
check its content. The same with a disk tier (a modelled spill file): blocks evicted from
memory are spilled and read back with their content intact. And the pool's copies
(runtime/kv_store.py) on real tensors, and its spill file on a real file."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from distserve.core import Request, SamplingParams, StepPlan
from distserve.core.kv_store import KVStore, Pending
from distserve.core.plan import ScheduledChunk
from distserve.model.config import ModelConfig
from distserve.runtime.kv_store import (
    SpillFile,
    StorePool,
    StoreRelay,
    from_numpy,
    gather_writes,
    scatter_writes,
    to_numpy,
    write_to_store,
)

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
        self._write(plan)
        if not lands:  # the instance died after its worker wrote: never committed
            return
        self._land(plan, pending)

    @precondition(lambda self: any(self.computed[r] == 0 for r in self.live))
    @rule(data=st.data())
    def prefill_from_store(self, data: st.DataObject) -> None:
        """A first prefill as a scheduler with `remote_prefix` plans it: the prefix blocks
        the store holds are loaded (their slots must hold exactly this prompt's KV, read
        back from disk or not), the rest computed."""
        rid = data.draw(st.sampled_from(sorted(r for r in self.live if self.computed[r] == 0)))
        req = self.live[rid]
        n = self.store.prefix_blocks(req, 0, (req.num_tokens - 1) // BS)
        table = tuple(1000 * int(rid[1:]) + i for i in range(-(-req.num_tokens // BS)))
        chunk = ScheduledChunk(rid, tuple(req.token_ids(n * BS, req.num_tokens)), n * BS,
                               table, None)  # fmt: skip
        loads = ((rid, 0, n),) if n else ()
        plan, pending = self.store.plan(StepPlan(0, (chunk,), loads=loads), self.live)
        assert len(plan.store_reads) == n
        tokens = req.all_token_ids
        for slot, block in plan.store_reads:  # the worker's reads
            i = block % 1000
            assert self.content[slot] == [tuple(tokens[: i * BS + o + 1]) for o in range(BS)]
        self._write(plan)
        self._land(plan, pending)

    def _write(self, plan: StepPlan) -> None:
        for block, slot, first, end in plan.store_writes:  # the worker's copies
            k, i = divmod(block, 1000)
            tokens = self.live[f"r{k}"].all_token_ids
            for off in range(first, end):
                self.content[slot][off] = tuple(tokens[: i * BS + off + 1])

    def _land(self, plan: StepPlan, pending: list[Pending]) -> None:
        self.store.commit(pending)
        for c in plan.chunks:
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
        # every slot free or cached (none leaked), and no pin outlives the plans
        assert self.store.num_free_slots == self.store.num_slots
        self.store.plan(StepPlan(0), {})
        assert not self.store._pinned  # noqa: SLF001


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


class FakeDisk:
    """A spill file modelled like the pool: per disk slot, the content it was given."""

    def __init__(self, content: list[list[tuple[int, ...] | None]]) -> None:
        self.content = content
        self.slots: dict[int, list[tuple[int, ...] | None]] = {}

    def write(self, slot: int, disk_slot: int) -> bool:
        self.slots[disk_slot] = list(self.content[slot])
        return True

    def read(self, disk_slot: int, slot: int) -> bool:
        self.content[slot] = list(self.slots[disk_slot])
        return True


class DiskStoreMachine(StoreMachine):
    """A store of few slots, most of its cache on a disk tier smaller than what spills."""

    def __init__(self) -> None:
        super().__init__()
        self.store = KVStore(7, BS, "model", num_disk_slots=4, disk=FakeDisk(self.content))


TestDiskStoreMachine = DiskStoreMachine.TestCase
TestDiskStoreMachine.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def _prefill(store: KVStore, req: Request) -> int:
    """A first prefill of `req` loading what the store holds; returns the blocks loaded."""
    rid = req.request_id
    n = store.prefix_blocks(req, 0, (req.num_tokens - 1) // BS)
    table = tuple(range(-(-req.num_tokens // BS)))
    chunk = ScheduledChunk(rid, tuple(req.token_ids(n * BS, req.num_tokens)), n * BS, table, None)
    plan, pending = store.plan(StepPlan(0, (chunk,), loads=((rid, 0, n),) if n else ()), {rid: req})
    store.commit(pending)
    store.release(rid)
    return n


def test_evicted_blocks_spill_to_disk_and_a_later_prompt_reads_them_back() -> None:
    store = KVStore(3, BS, "model", num_disk_slots=2)  # bookkeeping only (the simulator's)
    st = store.stats

    def req(rid: str, tokens: list[int]) -> Request:
        return Request(rid, tokens, SamplingParams(max_tokens=8), 0.0)

    _prefill(store, req("a", list(range(12))))  # 3 full blocks a0 a1 a2, cached
    _prefill(store, req("b", [9] * 8))  # takes a0 a1's slots: both spilled
    assert (st.evictions, st.spilled, st.disk_evictions, store.num_disk_blocks) == (2, 2, 0, 2)
    _prefill(store, req("c", [7] * 8))  # a2, b0 spilled; the full disk drops a0, a1
    assert (st.evictions, st.spilled, st.disk_evictions, store.num_disk_blocks) == (4, 4, 2, 2)
    store.check()
    # memory: b1 c0 c1, disk: a2 b0. b's prefix: b1 pinned where it is, b0 read back into
    # c0's slot (c0 spilled, pushing a2 off the full disk, never b0 itself)
    assert store.prefix_blocks(req("d", [9] * 8 + [1]), 0, 2) == 2
    assert (st.blocks_from_disk, st.spilled, st.disk_evictions) == (1, 5, 3)
    store.check()
    assert store.prefix_blocks(req("e", list(range(12)) + [1]), 0, 3) == 0  # a's: gone
    assert _prefill(store, req("d", [9] * 8 + [1])) == 2  # the plan loads them
    assert st.blocks_loaded == 2
    store.check()


def test_reading_back_a_prefix_does_not_push_out_the_rest_of_it() -> None:
    store = KVStore(4, BS, "model", num_disk_slots=2)
    _prefill(store, Request("a", [1] * 16, SamplingParams(max_tokens=8), 0.0))  # a0-a3
    _prefill(store, Request("b", [2] * 8, SamplingParams(max_tokens=8), 0.0))  # a0 a1 out
    # memory a2 a3 b0 b1, disk a0 a1 (full): reading a0 back evicts b0, not a2 or a3, and
    # b0 cannot go to the disk without dropping a1, so it is lost; a1 then evicts b1
    again = Request("c", [1] * 17, SamplingParams(max_tokens=8), 0.0)
    assert store.prefix_blocks(again, 0, 4) == 4
    assert store.stats.blocks_from_disk == 2 and store.stats.disk_evictions == 0
    assert store.num_disk_blocks == 1  # b1
    store.check()


def test_a_pinned_prefix_is_not_evicted_by_a_later_lookup() -> None:
    store = KVStore(2, BS, "model", num_disk_slots=4)
    for rid, tokens in (("a", [1] * 8), ("b", [2] * 8)):
        _prefill(store, Request(rid, tokens, SamplingParams(max_tokens=8), 0.0))
    assert store.num_disk_blocks == 2  # a's two blocks; b's in memory
    x = Request("x", [2] * 9, SamplingParams(max_tokens=8), 0.0)
    y = Request("y", [1] * 9, SamplingParams(max_tokens=8), 0.0)
    assert store.prefix_blocks(x, 0, 2) == 2
    assert store.prefix_blocks(y, 0, 2) == 0  # every slot is pinned for x's load
    store.check()
    store.plan(StepPlan(0), {})  # a plan (this one empty) ends the pins
    assert store.prefix_blocks(y, 0, 2) == 2
    store.check()


TINY = ModelConfig("llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=1, intermediate_size=32, max_position_embeddings=64)  # fmt: skip


def test_a_spilled_block_reads_back_the_bytes_written(tmp_path) -> None:
    pool = StorePool(TINY, 2**-10, BS, torch.bfloat16, shared=False)
    spill = SpillFile(pool, 4 * pool.bytes_per_slot / 2**30, str(tmp_path))
    try:
        assert spill.num_slots == 4
        assert os.listdir(tmp_path) == []  # unlinked once open: nothing outlives the server
        pool.blocks.copy_(torch.randn(pool.blocks.shape))
        want = pool.blocks[:, 1].clone()
        assert spill.write(1, 3) and spill.write(0, 2)
        pool.blocks[:, 1].zero_()
        assert spill.read(3, 5)
        assert torch.equal(pool.blocks[:, 5], want)
        assert torch.equal(pool.blocks[:, 1], torch.zeros_like(want))
    finally:
        spill.close()


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


def test_relayed_writes_land_as_mapped_ones() -> None:
    """A worker on another node packs what a step writes (gather_writes) and the
    controller unpacks it (scatter_writes, StoreRelay through numpy, bf16 included): the
    slots end as `write_to_store` would leave them; reads come back as the slots hold."""
    rows, blocks, head_dim = 6, 5, 3
    writes = ((3, 0, 0, BS), (1, 2, 1, 3), (4, 1, 0, BS))
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.randn(rows, blocks, BS * head_dim).to(dtype)
        mapped = torch.zeros(rows, 4, BS * head_dim, dtype=dtype)
        write_to_store(cache, mapped, writes, BS)
        relayed = torch.zeros_like(mapped)
        packed = gather_writes(cache, writes, BS)
        assert scatter_writes(relayed, writes, packed, BS) == packed.numel() * packed.element_size()
        assert torch.equal(relayed, mapped)

    pool = StorePool(TINY, 2**-10, BS, torch.bfloat16, shared=False)
    cache = torch.randn(pool.blocks.shape[0], 3, pool.blocks.shape[2]).to(torch.bfloat16)
    relay = StoreRelay(pool)
    writes = ((2, 1, 0, BS), (0, 3, 0, 1))
    relay.write(writes, to_numpy(gather_writes(cache, writes, BS)))
    assert torch.equal(pool.blocks[:, 1], cache[:, 2])
    assert torch.equal(from_numpy(relay.read([1, 3]), torch.bfloat16)[:, 0], cache[:, 2])
    with pytest.raises(ValueError, match="columns of KV"):
        relay.write(((0, 1, 0, BS),), to_numpy(gather_writes(cache, writes, BS)))
