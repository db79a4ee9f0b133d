"""BlockManager: paired verbs, watermark, fork / copy-on-write ref counting, and a
hypothesis state machine that checks the pool against a model after every operation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from distserve.core import BlockManager
from distserve.core.block_manager import OutOfBlocksError


def test_constructor_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_block_arithmetic() -> None:
    bm = BlockManager(8, 4)
    assert bm.capacity_tokens == 32
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.allocate("a", 5)
    assert bm.blocks_needed("a", 8) == 0
    assert bm.blocks_needed("a", 9) == 1
    assert bm.blocks_needed("a", 1) == 0
    assert bm.blocks_needed("b", 9) == 3


def test_allocate_grows_and_free_returns_every_block() -> None:
    bm = BlockManager(8, 4)
    assert bm.can_allocate("a", 9)
    first = bm.allocate("a", 9)
    assert len(first) == 3 and bm.block_table("a") == first
    assert bm.allocate("a", 12) == []  # still covered by three blocks
    grown = bm.allocate("a", 13)
    assert len(grown) == 1 and bm.block_table("a") == first + grown
    assert (bm.num_used_blocks, bm.num_free_blocks) == (4, 4)
    assert bm.has("a") and bm.num_blocks_of("a") == 4
    bm.check_integrity()

    released = bm.free("a")
    assert sorted(released) == sorted(first + grown)
    assert not bm.has("a") and bm.block_table("a") == []
    assert (bm.num_used_blocks, bm.num_free_blocks) == (0, 8)
    bm.check_integrity()


def test_block_table_is_a_copy() -> None:
    bm = BlockManager(4, 4)
    bm.allocate("a", 4)
    bm.block_table("a").append(3)
    assert bm.num_blocks_of("a") == 1
    bm.check_integrity()


def test_can_allocate_matches_allocate_at_the_boundary() -> None:
    bm = BlockManager(4, 4)
    bm.allocate("a", 8)
    assert bm.can_allocate("b", 8)
    assert not bm.can_allocate("b", 9)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks, 2 are free"):
        bm.allocate("b", 9)
    # A failed allocation changes nothing.
    assert not bm.has("b") and bm.num_free_blocks == 2
    bm.check_integrity()
    assert bm.allocate("b", 8) and bm.num_free_blocks == 0
    assert not bm.can_allocate("c", 1)
    assert bm.can_allocate("a", 8)  # needs nothing more


def test_allocating_zero_tokens_leaves_no_empty_table() -> None:
    bm = BlockManager(4, 4)
    assert bm.allocate("a", 0) == []
    assert not bm.has("a")
    bm.check_integrity()


def test_watermark_applies_only_to_admission() -> None:
    bm = BlockManager(10, 4, watermark=0.2)
    assert bm.watermark_blocks == 2
    assert bm.can_allocate("a", 32, admit=True)  # 8 blocks leave 2 free
    assert not bm.can_allocate("a", 33, admit=True)  # 9 blocks would leave 1
    assert bm.can_allocate("a", 33)  # a running request may grow into the watermark
    bm.allocate("a", 32)
    assert not bm.can_allocate("b", 1, admit=True)
    assert bm.can_allocate("b", 8)
    assert bm.can_allocate("a", 40) and not bm.can_allocate("a", 41)


def test_free_of_unknown_request_is_a_noop() -> None:
    bm = BlockManager(4, 4)
    bm.allocate("a", 4)
    assert bm.free("nobody") == []
    assert bm.free("a") != []
    assert bm.free("a") == []  # twice: no-op
    assert bm.num_free_blocks == 4
    bm.check_integrity()


def test_fork_shares_blocks_and_they_free_with_the_last_holder() -> None:
    bm = BlockManager(6, 4)
    parent = bm.allocate("p", 6)
    bm.fork("p", "c")
    assert bm.block_table("c") == parent
    assert bm.num_used_blocks == 2
    bm.check_integrity()
    assert bm.free("p") == []  # the child still holds them
    assert bm.num_used_blocks == 2
    bm.check_integrity()
    assert sorted(bm.free("c")) == sorted(parent)
    assert bm.num_free_blocks == 6


def test_fork_errors() -> None:
    bm = BlockManager(4, 4)
    bm.allocate("p", 4)
    bm.allocate("q", 4)
    with pytest.raises(KeyError):
        bm.fork("nobody", "c")
    with pytest.raises(ValueError):
        bm.fork("p", "q")
    bm.check_integrity()


def test_copy_on_write_gives_a_private_block() -> None:
    bm = BlockManager(6, 4)
    parent = bm.allocate("p", 6)  # blocks [b0 full, b1 half]
    bm.fork("p", "c")
    # Writing position 5 (block 1) of the child: shared, so copy it.
    copy = bm.copy_on_write("c", 5)
    assert copy is not None
    src, dst = copy
    assert src == parent[1] and dst not in parent
    assert bm.block_table("c") == [parent[0], dst]
    assert bm.block_table("p") == parent
    bm.check_integrity()
    # Now private on both sides.
    assert bm.copy_on_write("c", 5) is None
    assert bm.copy_on_write("p", 7) is None
    # Block 0 is still shared.
    assert bm.copy_on_write("p", 0) is not None
    bm.check_integrity()
    bm.free("p")
    bm.free("c")
    assert bm.num_free_blocks == 6
    bm.check_integrity()


def test_copy_on_write_without_a_free_block_raises_and_changes_nothing() -> None:
    bm = BlockManager(2, 4)
    bm.allocate("p", 8)
    bm.fork("p", "c")
    with pytest.raises(OutOfBlocksError):
        bm.copy_on_write("c", 0)
    assert bm.block_table("c") == bm.block_table("p")
    bm.check_integrity()


# ---- check_integrity must be able to fail ------------------------------------------


def _pool() -> BlockManager:
    bm = BlockManager(6, 4)
    bm.allocate("a", 8)
    bm.allocate("b", 4)
    bm.fork("a", "c")
    bm.check_integrity()
    return bm


def test_integrity_detects_a_wrong_ref_count() -> None:
    bm = _pool()
    bm._ref[bm.block_table("b")[0]] += 1
    with pytest.raises(AssertionError, match="ref 2 but 1 holders"):
        bm.check_integrity()


def test_integrity_detects_a_block_free_twice() -> None:
    bm = _pool()
    bm._free.append(bm._free[0])
    with pytest.raises(AssertionError, match="free list twice"):
        bm.check_integrity()


def test_integrity_detects_a_used_block_in_the_free_list() -> None:
    bm = _pool()
    bm._free.append(bm.block_table("b")[0])
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_integrity_detects_a_leaked_block() -> None:
    bm = _pool()
    bm._free.popleft()  # in no table and not free
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_integrity_detects_a_table_holding_a_free_block() -> None:
    bm = _pool()
    bm._tables["b"].append(bm._free[0])
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_integrity_detects_an_empty_table() -> None:
    bm = _pool()
    bm._tables["d"] = []
    with pytest.raises(AssertionError, match="empty table"):
        bm.check_integrity()


# ---- the state machine ---------------------------------------------------------------

IDS = st.sampled_from([f"r{i}" for i in range(6)])


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives a BlockManager and a model of it (request -> its table) side by side; the
    model's ref counts are the number of tables holding a block."""

    bm: BlockManager
    tables: dict[str, list[int]]

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.sampled_from([1, 2, 4]),
        watermark=st.sampled_from([0.0, 0.1, 0.25]),
    )
    def setup(self, num_blocks: int, block_size: int, watermark: float) -> None:
        self.bm = BlockManager(num_blocks, block_size, watermark)
        self.tables = {}

    # ---- the model ------------------------------------------------------------------
    def refs(self, block: int) -> int:
        return sum(t.count(block) for t in self.tables.values())

    def model_free(self) -> set[int]:
        used = {b for t in self.tables.values() for b in t}
        return set(range(self.bm.num_blocks)) - used

    # ---- rules ----------------------------------------------------------------------
    @rule(rid=IDS, num_tokens=st.integers(0, 50), admit=st.booleans())
    def allocate(self, rid: str, num_tokens: int, admit: bool) -> None:
        """Allocate a new request or grow an existing one."""
        held = len(self.tables.get(rid, []))
        need = max(0, self.bm.blocks_for(num_tokens) - held)
        free = len(self.model_free())
        reserve = self.bm.watermark_blocks if admit else 0
        assert self.bm.blocks_needed(rid, num_tokens) == need
        assert self.bm.can_allocate(rid, num_tokens, admit=admit) == (need <= free - reserve)
        if need > free:
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(rid, num_tokens)
            return
        before = self.model_free()
        new = self.bm.allocate(rid, num_tokens)
        assert len(new) == need and len(set(new)) == need
        assert set(new) <= before
        if new:
            self.tables.setdefault(rid, []).extend(new)

    @rule(rid=IDS)
    def free(self, rid: str) -> None:
        table = self.tables.pop(rid, [])
        expected = [b for b in table if self.refs(b) == 0]
        assert sorted(self.bm.free(rid)) == sorted(expected)

    @rule(parent=IDS, child=IDS)
    def fork(self, parent: str, child: str) -> None:
        if child in self.tables:
            with pytest.raises(ValueError):
                self.bm.fork(parent, child)
        elif parent not in self.tables:
            with pytest.raises(KeyError):
                self.bm.fork(parent, child)
        else:
            self.bm.fork(parent, child)
            self.tables[child] = list(self.tables[parent])

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def copy_on_write(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tables)))
        table = self.tables[rid]
        position = data.draw(st.integers(0, len(table) * self.bm.block_size - 1))
        idx = position // self.bm.block_size
        old = table[idx]
        if self.refs(old) == 1:
            assert self.bm.copy_on_write(rid, position) is None
            return
        free = self.model_free()
        if not free:
            with pytest.raises(OutOfBlocksError):
                self.bm.copy_on_write(rid, position)
            return
        copy = self.bm.copy_on_write(rid, position)
        assert copy is not None
        src, dst = copy
        assert src == old and dst in free
        table[idx] = dst

    # ---- checks ---------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_integrity()
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_free_blocks == len(self.model_free())
        for rid in {f"r{i}" for i in range(6)}:
            assert bm.block_table(rid) == self.tables.get(rid, [])
            assert bm.has(rid) == (rid in self.tables)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in list(self.tables):
            self.bm.free(rid)
            self.bm.check_integrity()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_used_blocks == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
