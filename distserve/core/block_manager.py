"""Hands out fixed-size KV blocks and keeps one block table per request.

A block table maps a request's token positions to physical blocks:

    position p  ->  block table[p // block_size], slot p % block_size

Blocks are ref-counted so that requests may share full blocks (`fork`, prefix hits); a
block returns to the free list when its last holder lets go. The manager only counts: the
tensors live in runtime/, and whoever schedules the request decides when to free.

With prefix caching, a full block whose KV has been computed is registered under the name
of its prefix (`core/prefix_cache.py`); when its last holder lets go it is *parked*, not
freed: it keeps its KV, a later request with the same prefix takes it again (`lookup`,
then `allocate(..., cached=...)`), and it is evicted, least recently released first, only
when an allocation finds the free list empty. Every block is in exactly one state:

    empty   ref 0, in the free list, no name
    parked  ref 0, named, evictable            (counted in num_free_blocks and
                                                num_cached_blocks)
    used    ref >= 1, held by that many tables (named or not; never evicted)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from distserve.core.prefix_cache import PrefixCache, TokenSequence


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when the free list cannot cover the request."""


class BlockManager:
    """Ref-counted pool of `num_blocks` blocks of `block_size` tokens.

    Invariants (checked by `check_integrity`): every block is empty (ref 0, in the free
    list once), parked (ref 0, named in the prefix cache, evictable) or used (ref >= 1,
    equal to the number of tables holding it); empty + parked + used = total.
    `prefix_caching` turns naming and parking on; `cache_key` names the model (or any
    namespace) whose KV the blocks hold, so that equal tokens under another model never
    match.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        watermark: float = 0.0,
        *,
        prefix_caching: bool = False,
        cache_key: str = "",
    ) -> None:
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
        self.cache = PrefixCache(cache_key, block_size) if prefix_caching else None
        """The prefix cache (None: off); owned by this manager, read-only to others."""

    # ---- queries -------------------------------------------------------------------
    @property
    def prefix_caching(self) -> bool:
        return self.cache is not None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: empty ones and parked (evictable) ones."""
        cache = self.cache  # inlined: the simulator asks this every step of every request
        return len(self._free) + (len(cache._parked) if cache is not None else 0)

    @property
    def num_cached_blocks(self) -> int:
        """Parked blocks: unreferenced, still holding a cached prefix's KV."""
        return self.cache.num_parked if self.cache is not None else 0

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

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
        table = self._tables.get(request_id)
        need = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
        return need if need > 0 else 0

    # ---- prefix caching ------------------------------------------------------------
    def lookup(self, seq: TokenSequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`'s full blocks, leaving at
        least its last token out (its logits must be computed). Changes no block; pass
        the result to `can_allocate`/`allocate` before anything else allocates, as an
        allocation may evict what this found. Empty without prefix caching."""
        if self.cache is None:
            return []
        return self.cache.match(seq, (seq.num_tokens - 1) // self.block_size)

    def cache_blocks(self, seq: TokenSequence, num_computed: int) -> None:
        """Register the full blocks of `seq`'s table whose KV is computed (positions
        [0, num_computed)), so later requests can take them. Call after the step that
        computed them has run, never before: a name promises the KV is there."""
        cache = self.cache
        if cache is None:
            return
        table = self._tables.get(seq.request_id)
        if table is None:
            return
        full = num_computed // self.block_size
        if full > len(table):
            full = len(table)
        # Most decode steps fill no block: then `register` would do nothing (its count,
        # inlined: once per request per step).
        if full > cache._num_registered.get(seq.request_id, 0):
            cache.register(seq, table, full)

    # ---- paired verbs --------------------------------------------------------------
    def can_allocate(
        self,
        request_id: str,
        num_tokens: int,
        *,
        admit: bool = False,
        cached: Sequence[int] = (),
    ) -> bool:
        """Whether `allocate(request_id, num_tokens, cached)` would succeed. With `admit`, a
        newly admitted request must also leave the watermark free, so that running
        requests can still grow a little before anyone is preempted. Parked blocks among
        `cached` count as taken: they stop being evictable."""
        reserve = self.watermark_blocks if admit else 0
        return self._cost(request_id, num_tokens, cached) <= self.num_free_blocks - reserve

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Grow the request's table to cover `num_tokens` tokens; return the new blocks.
        `cached` (from `lookup`, for a request holding no table) starts the table: those
        blocks are shared, not new. New blocks come from the free list, else by evicting
        the least recently released parked block."""
        if not cached:  # the common case (every step of a running request), kept short
            table = self._tables.get(request_id)
            need = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
            if need <= 0:
                return []  # covered already (most steps): nothing to take
            if need > self.num_free_blocks:
                raise OutOfBlocksError(
                    f"request {request_id} needs {need} blocks, {self.num_free_blocks} are free"
                )
            if table is None:
                table = self._tables[request_id] = []
            return self._grow(table, need)
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds blocks: no cached prefix")
        if any(self.cache is None or not self.cache.is_registered(b) for b in cached):
            raise ValueError(f"request {request_id}: cached blocks must hold a cached prefix")
        cost = self._cost(request_id, num_tokens, cached)
        if cost > self.num_free_blocks:
            raise OutOfBlocksError(
                f"request {request_id} needs {cost} blocks, {self.num_free_blocks} are free"
            )
        need = max(0, self.blocks_needed(request_id, num_tokens) - len(cached))
        table = self._tables.setdefault(request_id, [])
        for b in cached:  # before taking new blocks, so that no eviction can take these
            if self.cache is not None and self.cache.is_parked(b):
                self.cache.unpark(b)
            self._ref[b] += 1
        table.extend(cached)
        return self._grow(table, need)

    def _grow(self, table: list[int], need: int) -> list[int]:
        """Append `need` new blocks (ref 1) to `table`; return them. The caller has checked
        that enough are free."""
        # _take `need` times: the free list's first blocks, then evictions (at once: a
        # prompt takes dozens)
        free, ref = self._free, self._ref
        if need == 1:  # a decode step's new block
            b = free.popleft() if free else self._take()
            ref[b] = 1
            table.append(b)
            return [b]
        new = [free.popleft() for _ in range(min(need, len(free)))]
        if len(new) < need:
            new += [self._take() for _ in range(need - len(new))]
        for b in new:
            ref[b] = 1
        table.extend(new)
        return new

    def free(self, request_id: str) -> list[int]:
        """Drop the request's references; return the blocks no table holds any more
        (named ones are parked, the rest go to the free list). Freeing a request that
        holds nothing is a no-op (so abort after finish is safe)."""
        released = []
        ref = self._ref
        for b in self._tables.pop(request_id, ()):
            ref[b] -= 1
            if ref[b] == 0:
                released.append(b)
        cache = self.cache
        if cache is None:
            self._free.extend(released)
            return released
        cache.forget(request_id)
        named = cache._name_of  # cache.is_registered, inlined: once per block of a request
        self._free.extend(b for b in released if b not in named)
        # The tail parks first, so it is evicted first: a prefix outlives its extensions.
        for b in reversed(released):
            if b in named:
                cache.park(b)
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
        if not self.num_free_blocks:
            raise OutOfBlocksError(f"request {request_id}: no free block for copy-on-write")
        new = self._take()
        self._ref[new] = 1
        self._ref[old] -= 1
        table[idx] = new
        return old, new

    def _cost(self, request_id: str, num_tokens: int, cached: Sequence[int]) -> int:
        """Free blocks an allocation takes: its new blocks plus the parked cached ones."""
        need = max(0, self.blocks_needed(request_id, num_tokens) - len(cached))
        if not cached:
            return need
        return need + sum(1 for b in cached if self._ref[b] == 0)

    def _take(self) -> int:
        """An empty block: from the free list, else the least recently parked one."""
        if self._free:
            return self._free.popleft()
        assert self.cache is not None and self.cache.num_parked, "no block to take"
        return self.cache.evict()

    # ---- integrity -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError with the first violated invariant: ref counts equal the
        tables holding each block; each block is empty, parked or used, once; empty +
        parked + used = total (no leak); the prefix cache's own maps agree."""
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
        cache = self.cache
        for b in range(self.num_blocks):
            parked = cache is not None and cache.is_parked(b)
            if (self._ref[b] == 0) != (b in free_set or parked):
                raise AssertionError(
                    f"block {b}: ref {self._ref[b]}, in free list: {b in free_set}, "
                    f"parked: {parked}"
                )
            if b in free_set and cache is not None and cache.is_registered(b):
                raise AssertionError(f"block {b} is in the free list but has a name")
        used = sum(1 for r in self._ref if r > 0)
        if len(free) + self.num_cached_blocks + used != self.num_blocks:
            raise AssertionError("empty + parked + used != total")
        if cache is not None:
            cache.check(self._ref, self._tables)

    def __repr__(self) -> str:
        return (
            f"BlockManager(used={self.num_used_blocks}, free={self.num_free_blocks}, "
            f"cached={self.num_cached_blocks}, requests={len(self._tables)}, "
            f"block_size={self.block_size})"
        )
