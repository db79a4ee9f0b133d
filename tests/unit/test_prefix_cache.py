"""Prefix caching in the BlockManager: chained block names, longest-prefix lookup, shared
blocks with exact ref counts, parking and LRU eviction that never touches a block in use,
an integrity check that sees the new states, and a hypothesis state machine that checks
every hit against the KV a block really holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from distserve.core import BlockManager, CacheConfig
from distserve.core.block_manager import OutOfBlocksError
from distserve.core.prefix_cache import chain_hash, root_hash


@dataclass
class Seq:
    """A request as the block manager sees it (the TokenSequence protocol)."""

    request_id: str
    tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def pool(num_blocks: int = 16, block_size: int = 4, key: str = "m") -> BlockManager:
    return BlockManager(num_blocks, block_size, prefix_caching=True, cache_key=key)


def run(bm: BlockManager, seq: Seq) -> list[int]:
    """Admit `seq` with its cached prefix, 'compute' all of it, return its table."""
    cached = bm.lookup(seq)
    bm.allocate(seq.request_id, seq.num_tokens, cached)
    bm.cache_blocks(seq, seq.num_tokens)
    bm.check_integrity()
    return bm.block_table(seq.request_id)


# ---- names ---------------------------------------------------------------------------


def test_names_chain_over_every_earlier_block_and_the_key() -> None:
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    h_ab = chain_hash(chain_hash(root_hash("m"), a), b)
    assert h_ab == chain_hash(chain_hash(root_hash("m"), a), b)  # deterministic
    assert h_ab != chain_hash(chain_hash(root_hash("m"), [9, 2, 3, 4]), b)  # the prefix counts
    assert h_ab != chain_hash(chain_hash(root_hash("other"), a), b)  # and the model
    assert chain_hash(root_hash("m"), [1, 2]) != chain_hash(root_hash("m"), [2, 1])
    assert chain_hash(root_hash("m"), [1 << 40]) != chain_hash(root_hash("m"), [0])
    assert len(h_ab) == 16


def test_another_model_never_matches() -> None:
    seq = Seq("a", list(range(13)))
    bm_m, bm_n = pool(key="m"), pool(key="n")
    run(bm_m, seq)
    run(bm_n, seq)
    assert bm_m.cache is not None and bm_n.cache is not None
    names_m = bm_m.cache.names(Seq("x", seq.tokens), 3)
    names_n = bm_n.cache.names(Seq("x", seq.tokens), 3)
    assert not set(names_m) & set(names_n)


# ---- lookup and sharing --------------------------------------------------------------


def test_lookup_finds_the_longest_prefix_of_full_blocks() -> None:
    bm = pool()
    a = Seq("a", list(range(100, 114)))  # 3 full blocks + 2 tokens
    table_a = run(bm, a)
    assert bm.lookup(Seq("b", list(range(100, 120)))) == table_a[:3]  # partial block: never
    assert bm.lookup(Seq("c", [*range(100, 108), 0, 0, 0, 0, 1])) == table_a[:2]
    assert bm.lookup(Seq("d", [0, *range(101, 114)])) == []  # differs in the first block
    assert bm.lookup(Seq("e", [1, 2, 3])) == []


def test_a_whole_cached_prompt_still_computes_its_last_token() -> None:
    bm = pool()
    a = Seq("a", list(range(12)))  # 3 full blocks
    table_a = run(bm, a)
    # The same 12 tokens: the last block holds token 11, whose logits must be computed.
    assert bm.lookup(Seq("b", list(range(12)))) == table_a[:2]
    assert bm.lookup(Seq("c", list(range(13)))) == table_a[:3]


def test_shared_blocks_are_ref_counted_exactly() -> None:
    bm = pool(8)
    a = Seq("a", list(range(10)))
    table_a = run(bm, a)
    b = Seq("b", [*range(8), 50, 51, 52])
    cached = bm.lookup(b)
    assert cached == table_a[:2]
    assert bm.can_allocate("b", b.num_tokens, cached=cached)
    new = bm.allocate("b", b.num_tokens, cached)
    assert len(new) == 1 and bm.block_table("b") == [*table_a[:2], *new]
    assert bm.num_used_blocks == 4  # 3 of a's, 1 of b's own
    bm.check_integrity()
    assert bm.free("a") == [table_a[2]]  # the shared two stay used by b
    assert bm.num_used_blocks == 3
    bm.check_integrity()
    bm.free("b")
    assert bm.num_used_blocks == 0
    bm.check_integrity()


def test_allocate_with_a_cached_prefix_needs_a_fresh_table() -> None:
    bm = pool()
    table_a = run(bm, Seq("a", list(range(9))))
    bm.allocate("b", 4)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate("b", 12, table_a[:1])
    with pytest.raises(ValueError, match="cached prefix"):
        bm.allocate("c", 12, [bm.block_table("b")[0]])  # not a named block
    bm.check_integrity()


def test_only_computed_full_blocks_are_named() -> None:
    bm = pool()
    a = Seq("a", list(range(14)))
    bm.allocate("a", 14)
    bm.cache_blocks(a, 6)  # one full block computed
    assert bm.lookup(Seq("b", list(range(14)))) == bm.block_table("a")[:1]
    bm.cache_blocks(a, 14)
    assert bm.lookup(Seq("b", list(range(14)))) == bm.block_table("a")[:3]
    bm.check_integrity()


def test_a_duplicate_block_stays_unnamed_and_frees_to_the_free_list() -> None:
    bm = pool(8)
    a, b = Seq("a", list(range(9))), Seq("b", list(range(9)))
    bm.allocate("a", 9)
    bm.allocate("b", 9)  # both admitted before either computed: no hit
    bm.cache_blocks(a, 9)
    bm.cache_blocks(b, 9)  # same names: b's blocks stay unnamed
    assert bm.lookup(Seq("c", list(range(9)))) == bm.block_table("a")[:2]
    bm.free("b")
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 5
    bm.free("a")
    assert bm.num_cached_blocks == 2  # a's two full blocks are parked, its third freed
    bm.check_integrity()


# ---- parking and eviction ------------------------------------------------------------


def test_freed_named_blocks_stay_cached_until_their_memory_is_needed() -> None:
    bm = pool(5)
    a = Seq("a", list(range(13)))  # 3 full blocks + 1
    table_a = run(bm, a)
    bm.free("a")
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 5 and bm.num_used_blocks == 0
    bm.check_integrity()
    # A request that shares nothing takes the two empty blocks first...
    bm.allocate("x", 8)
    assert bm.num_cached_blocks == 3
    # ...then evicts parked ones, tail first: the prefix outlives its extensions.
    bm.allocate("y", 4)
    assert bm.lookup(Seq("b", list(range(13)))) == table_a[:2]
    bm.allocate("z", 4)
    assert bm.lookup(Seq("b", list(range(13)))) == table_a[:1]
    bm.check_integrity()
    bm.allocate("w", 4)
    assert bm.lookup(Seq("b", list(range(13)))) == []
    assert bm.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        bm.allocate("v", 1)
    bm.check_integrity()


def test_least_recently_released_is_evicted_first() -> None:
    bm = pool(4, 4)
    run(bm, Seq("old", [1, 1, 1, 1, 9]))
    run(bm, Seq("new", [2, 2, 2, 2, 9]))
    bm.free("old")
    bm.free("new")  # parked after old's block
    bm.allocate("x", 12)  # 2 empty blocks, then one eviction: old's
    assert bm.lookup(Seq("q", [1, 1, 1, 1, 0])) == []
    assert len(bm.lookup(Seq("q", [2, 2, 2, 2, 0]))) == 1
    bm.check_integrity()


def test_a_hit_takes_its_blocks_before_new_ones_so_it_cannot_evict_them() -> None:
    bm = pool(4)
    run(bm, Seq("a", list(range(12))))
    bm.free("a")  # 3 parked + 1 empty
    b = Seq("b", [*range(8), 70, 71, 72, 73, 74])  # hits 2, needs 2 more
    cached = bm.lookup(b)
    assert len(cached) == 2
    assert bm.can_allocate("b", b.num_tokens, cached=cached)
    new = bm.allocate("b", b.num_tokens, cached)  # the empty block, then evicts a's third
    assert bm.block_table("b")[:2] == cached and not set(new) & set(cached)
    bm.check_integrity()


def test_parked_cached_blocks_count_against_what_an_admission_may_take() -> None:
    bm = BlockManager(4, 4, 0.25, prefix_caching=True)  # watermark: 1 block
    run(bm, Seq("a", list(range(9))))
    bm.free("a")  # 2 parked, 2 empty
    b = Seq("b", [*range(8), 5, 5, 5, 5, 5])  # 2 hits (both parked) + 2 new = 4 > 4 - 1
    cached = bm.lookup(b)
    assert not bm.can_allocate("b", b.num_tokens, admit=True, cached=cached)
    assert bm.can_allocate("b", b.num_tokens, cached=cached)
    assert bm.can_allocate("b", 12, admit=True, cached=cached)  # 2 hits + 1 new
    bm.check_integrity()


def test_eviction_never_touches_a_block_in_use() -> None:
    bm = pool(4)
    table_a = run(bm, Seq("a", list(range(12))))  # 3 named blocks in use
    assert bm.num_free_blocks == 1
    bm.allocate("b", 4)
    with pytest.raises(OutOfBlocksError):
        bm.allocate("c", 4)
    assert bm.block_table("a") == table_a
    assert bm.lookup(Seq("q", list(range(13)))) == table_a
    bm.check_integrity()


def test_copy_on_write_may_evict_a_parked_block() -> None:
    bm = pool(3)
    run(bm, Seq("a", list(range(4))))
    bm.free("a")  # 1 parked
    bm.allocate("p", 6)  # 2 blocks: the empty ones
    bm.fork("p", "c")
    src_dst = bm.copy_on_write("c", 5)
    assert src_dst is not None and bm.num_cached_blocks == 0
    bm.check_integrity()


def test_without_prefix_caching_nothing_is_named_or_parked() -> None:
    bm = BlockManager(4, 4)
    seq = Seq("a", list(range(12)))
    bm.allocate("a", 12)
    bm.cache_blocks(seq, 12)
    assert bm.lookup(Seq("b", list(range(12)))) == []
    bm.free("a")
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 4
    assert not bm.prefix_caching
    bm.check_integrity()


def test_cache_config_prefix_caching_is_on_by_default_and_checked() -> None:
    assert CacheConfig().prefix_caching is True
    assert CacheConfig(prefix_caching=False).prefix_caching is False
    with pytest.raises(ValueError, match="prefix_caching must be a bool"):
        CacheConfig(prefix_caching="no")  # type: ignore[arg-type]


# ---- the integrity check sees the new states ----------------------------------------


def _cached_pool() -> BlockManager:
    bm = pool(6)
    run(bm, Seq("a", list(range(9))))
    run(bm, Seq("b", list(range(100, 109))))
    bm.free("a")  # 2 parked, a's partial block freed
    bm.check_integrity()
    return bm


def _parked(bm: BlockManager) -> int:
    assert bm.cache is not None
    return next(iter(bm.cache._parked))


def test_integrity_detects_a_parked_block_in_the_free_list() -> None:
    bm = _cached_pool()
    bm._free.append(_parked(bm))
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_integrity_detects_a_parked_block_that_is_held() -> None:
    bm = _cached_pool()
    bm._tables["b"].append(_parked(bm))
    bm._ref[_parked(bm)] += 1
    with pytest.raises(AssertionError, match="parked"):
        bm.check_integrity()


def test_integrity_detects_a_lost_parked_block() -> None:
    bm = _cached_pool()
    assert bm.cache is not None
    del bm.cache._parked[_parked(bm)]  # named, ref 0, neither free nor parked: leaked
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_integrity_detects_names_that_do_not_map_back() -> None:
    bm = _cached_pool()
    assert bm.cache is not None
    b = _parked(bm)
    bm.cache._name_of[b] = b"x" * 16
    with pytest.raises(AssertionError, match="name"):
        bm.check_integrity()


# ---- the state machine ---------------------------------------------------------------

IDS = st.sampled_from([f"r{i}" for i in range(5)])
# Prompts are a prefix of one of two texts plus a short random tail, so that they share
# prefixes often, and differ right after them.
TEXTS = ([0, 1, 2, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 0], [1, 1, 0, 2, 0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
PROMPTS = st.builds(
    lambda text, n, tail: TEXTS[text][:n] + tail,
    st.integers(0, 1),
    st.integers(0, 14),
    st.lists(st.integers(0, 2), max_size=3),
).filter(bool)


class PrefixCacheMachine(RuleBasedStateMachine):
    """Requests are admitted with their cached prefix, compute, grow and leave in any
    order. The test keeps what each block really holds (the token prefix its KV is of,
    written when a request computes it) and checks every hit against it, so a block
    evicted while in use, a name left on a reused block, or a wrong chain shows as a hit
    on the wrong KV. Ref counts are checked against the tables, and at the end every
    block is free or parked."""

    bm: BlockManager

    @initialize(num_blocks=st.integers(1, 14), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching=True, cache_key="m")
        self.seqs: dict[str, Seq] = {}
        self.computed: dict[str, int] = {}
        self.kv: dict[int, tuple[int, ...]] = {}
        """Block -> the tokens [0, end of block) whose KV it holds (full blocks only)."""

    def bs(self) -> int:
        return self.bm.block_size

    @rule(rid=IDS, prompt=PROMPTS)
    def admit(self, rid: str, prompt: list[int]) -> None:
        if rid in self.seqs:
            return
        seq = Seq(rid, prompt)
        cached = self.bm.lookup(seq)
        bs = self.bs()
        assert len(cached) <= (len(prompt) - 1) // bs
        for i, b in enumerate(cached):  # a hit is the KV of exactly this prefix
            assert self.kv.get(b) == tuple(prompt[: (i + 1) * bs])
        # Maximal: the next full block's prefix is held by no named block.
        nxt = len(cached)
        if nxt < (len(prompt) - 1) // bs:
            want = tuple(prompt[: (nxt + 1) * bs])
            assert self.bm.cache is not None
            named = [b for b, p in self.kv.items() if p == want and self.bm.cache.is_registered(b)]
            assert not named
        cost = max(0, self.bm.blocks_for(len(prompt)) - len(cached))
        cost += sum(1 for b in cached if self.bm.cache and self.bm.cache.is_parked(b))
        ok = self.bm.can_allocate(rid, len(prompt), cached=cached)
        assert ok == (cost <= self.bm.num_free_blocks)
        if not ok:
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(rid, len(prompt), cached)
            return
        held = {b for s in self.seqs for b in self.bm.block_table(s)}
        parked_before = self.bm.num_cached_blocks
        new = self.bm.allocate(rid, len(prompt), cached)
        assert not set(new) & held, "a block in use was handed out again"
        event(f"hit: {bool(cached)}")
        event(f"evicted: {self.bm.num_cached_blocks < parked_before - len(cached)}")
        for b in new:
            self.kv.pop(b, None)  # evicted or empty: its old KV is gone once written
        self.seqs[rid] = seq
        self.computed[rid] = len(cached) * bs

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq, bs = self.seqs[rid], self.bs()
        end = data.draw(st.integers(self.computed[rid], seq.num_tokens))
        table = self.bm.block_table(rid)
        for i in range(self.computed[rid] // bs, end // bs):  # blocks this fills
            self.kv[table[i]] = tuple(seq.tokens[: (i + 1) * bs])
        self.computed[rid] = end
        self.bm.cache_blocks(seq, end)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data(), token=st.integers(0, 2))
    def grow(self, data: st.DataObject, token: int) -> None:
        """An output token: the sequence grows by one once everything is computed."""
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        seq = self.seqs[rid]
        if self.computed[rid] < seq.num_tokens:
            return
        if not self.bm.can_allocate(rid, seq.num_tokens + 1):
            return
        held = {b for s in self.seqs for b in self.bm.block_table(s)}
        new = self.bm.allocate(rid, seq.num_tokens + 1)
        assert not set(new) & held
        for b in new:
            self.kv.pop(b, None)
        seq.tokens.append(token)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        table = self.bm.block_table(rid)
        released = self.bm.free(rid)
        others = {b for s in self.seqs if s != rid for b in self.bm.block_table(s)}
        assert sorted(released) == sorted(b for b in set(table) if b not in others)
        del self.seqs[rid], self.computed[rid]

    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_integrity()
        refs: dict[int, int] = {}
        for rid in self.seqs:
            for b in bm.block_table(rid):
                refs[b] = refs.get(b, 0) + 1
        assert bm.num_used_blocks == len(refs)
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert 0 <= bm.num_cached_blocks <= bm.num_free_blocks
        for rid, seq in self.seqs.items():
            assert len(bm.block_table(rid)) == bm.blocks_for(seq.num_tokens)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in list(self.seqs):
            self.bm.free(rid)
            self.bm.check_integrity()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks  # no leak: free or parked


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase


def test_lookup_stops_at_its_cap_even_with_more_names_known() -> None:
    bm = pool()
    seq = Seq("a", list(range(12)))
    run(bm, Seq("z", list(range(13))))  # names all three full blocks of these tokens
    assert bm.cache is not None
    bm.cache.names(seq, 3)  # "a"'s names are known beyond what a lookup may use
    assert len(bm.lookup(seq)) == 2
