"""Hands out fixed-size KV blocks and keeps one block table per request.

A block table maps a request's token positions to physical blocks:

    position p  ->  block table[p // block_size], slot p % block_size

Blocks are ref-counted so that requests may share full blocks (`fork`); a block returns
to the free list when its last holder lets go. The manager only counts: the tensors
live in runtime/, and whoever schedules the request decides when to free.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when the free list cannot cover the request."""


class BlockManager:
    """Ref-counted pool of `num_blocks` blocks of `block_size` tokens.

    Invariants (checked by `check_integrity`): every block is either free (ref 0, in the
    free list once) or used (ref >= 1, equal to the number of tables holding it).
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's table (empty if it holds none)."""
        return list(self._tables.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Further blocks the request needs for its table to cover `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - self.num_blocks_of(request_id))

    # ---- paired verbs --------------------------------------------------------------
    def can_allocate(self, request_id: str, num_tokens: int, *, admit: bool = False) -> bool:
        """Whether `allocate(request_id, num_tokens)` would succeed. With `admit`, a newly
        admitted request must also leave the watermark free, so that running requests
        can still grow a little before anyone is preempted."""
        reserve = self.watermark_blocks if admit else 0
        return self.blocks_needed(request_id, num_tokens) <= len(self._free) - reserve

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens` tokens; return the new blocks."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"request {request_id} needs {need} blocks, {len(self._free)} are free"
            )
        if need == 0:
            return []  # no table for a request that needs nothing (tables are never empty)
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() for _ in range(need)]
        for b in new:
            self._ref[b] = 1
        table.extend(new)
        return new

    def free(self, request_id: str) -> list[int]:
        """Drop the request's references; return the blocks that became free.
        Freeing a request that holds nothing is a no-op (so abort after finish is safe)."""
        released = []
        for b in self._tables.pop(request_id, ()):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                released.append(b)
        return released

    def fork(self, parent_id: str, child_id: str) -> None:
        """Let `child_id` share every block of `parent_id` (e.g. parallel samples)."""
        if child_id in self._tables:
            raise ValueError(f"request {child_id} already holds blocks")
        table = self._tables.get(parent_id)
        if table is None:
            raise KeyError(f"request {parent_id} holds no blocks")
        for b in table:
            self._ref[b] += 1
        self._tables[child_id] = list(table)

    def copy_on_write(self, request_id: str, position: int) -> tuple[int, int] | None:
        """Before writing the KV of `position`: if its block is shared, give the request a
        private block instead. Returns (source, destination) for the caller to copy, or
        None when the block is already private."""
        table = self._tables[request_id]
        idx = position // self.block_size
        old = table[idx]
        if self._ref[old] == 1:
            return None
        if not self._free:
            raise OutOfBlocksError(f"request {request_id}: no free block for copy-on-write")
        new = self._free.popleft()
        self._ref[new] = 1
        self._ref[old] -= 1
        table[idx] = new
        return old, new

    # ---- integrity -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError with the first violated invariant."""
        free = list(self._free)
        if len(set(free)) != len(free):
            raise AssertionError("a block is in the free list twice")
        holders = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if not table:
                raise AssertionError(f"request {rid} has an empty table")
            for b in table:
                holders[b] += 1
        for b in range(self.num_blocks):
            if holders[b] != self._ref[b]:
                raise AssertionError(f"block {b}: ref {self._ref[b]} but {holders[b]} holders")
        free_set = set(free)
        for b in range(self.num_blocks):
            if (self._ref[b] == 0) != (b in free_set):
                raise AssertionError(
                    f"block {b}: ref {self._ref[b]}, in free list: {b in free_set}"
                )
        if len(free) + sum(1 for r in self._ref if r > 0) != self.num_blocks:
            raise AssertionError("free + used != total")

    def __repr__(self) -> str:
        return (
            f"BlockManager(used={self.num_used_blocks}, free={self.num_free_blocks}, "
            f"requests={len(self._tables)}, block_size={self.block_size})"
        )
