"""The KV store's directory: which slot of the pool (runtime/kv_store.py) holds which block
of which request, by name, so that a request's KV outlives the instance that computed it.

Every step of an instance writes its new KV through to the store (`plan` adds the copies
to the step's plan; the worker makes them during the forward pass, each layer's rows as
that layer finishes, or after it for a decode-only step; `commit` records them
once the step has returned): a prompt's blocks after its prefill, one token a request
after each decode step. So at any time the store holds, for each live request, the KV of
every token but its last (`StoreEntry.valid`), and a decode instance that dies is replaced
by one that reads the request's KV back from the store (cluster/recovery.py) instead of
computing the prompt and the generated tokens again.

Slots are named like the block manager's cached blocks (core/prefix_cache.py: a hash
chained over the tokens of the block and all before it, seeded by the model), so two
requests sharing a prefix share its full slots, and a full slot outlives its requests as
cache (LRU among the unreferenced ones) until its memory is needed. A request's partial
last block has a private slot. Every slot is in one state:

    free     ref 0, unnamed, in the free list
    parked   ref 0, named, evictable (least recently released first)
    held     ref >= 1: held by that many requests' entries (named or private)

When no slot is free or parked, the request that asked stops being written (`broken`): it
runs on, and a fault falls back to recomputing it.

With a disk tier (serve --kv-store-disk-gb), an evicted parked slot's block is spilled
first: `DiskTier.write` copies the slot into a slot of a spill file, and the name moves to
the disk index (least recently spilled dropped first when it is full). A prefix lookup
that misses memory and finds the name there reads it back into a slot (`DiskTier.read`)
and serves it as a memory hit: a name is in memory or on disk, never both. Both copies
run inside `_take`/`prefix_blocks`, before the plan that reuses the slot is returned, so
a slot's bytes leave before any worker writes over them. Slots a lookup counted are
pinned until the next `plan` consumes them, so that a later lookup's read-back cannot
evict them first.

Nothing here touches tensors: the directory is bookkeeping, like the block manager's, so
the simulator keeps one too and gets the same hits (sim/simulator.py); the controller's
copy drives real copies (cluster/store_link.py, and its `DiskTier` for the disk).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Protocol

from distserve.core.disk_index import DiskIndex
from distserve.core.plan import StepPlan
from distserve.core.prefix_cache import BlockHash, TokenSequence, chain_hash, root_hash
from distserve.core.request import Request


@dataclass
class StoreEntry:
    """What the store holds of one live request."""

    slots: list[int] = field(default_factory=list)
    """Per block index of the request, the slot holding it (-1: none yet)."""
    names: list[BlockHash] = field(default_factory=list)
    """The chain names of its full blocks, as far as computed."""
    valid: int = 0
    """Tokens 0 .. valid-1 have their KV in the store."""
    broken: bool = False
    """The store ran out of slots for it: no longer written, never resumed from."""


@dataclass(frozen=True)
class Pending:
    """What one step wrote, recorded by `commit` once the step has returned."""

    request_id: str
    context_len: int
    full: tuple[tuple[int, BlockHash], ...]
    """(block index, name) of the blocks the step filled."""


@dataclass
class StoreStats:
    bytes_written: int = 0
    blocks_shared: int = 0
    """Full blocks a request found in the store already (not written again)."""
    blocks_loaded: int = 0
    """Full blocks of prompts read from the store instead of computed (prefix hits
    another instance made)."""
    evictions: int = 0
    resumes: int = 0
    """Requests whose KV was read back from the store after their instance died."""
    tokens_resumed: int = 0
    broken: int = 0
    spilled: int = 0
    """Evicted named blocks written to the disk tier."""
    blocks_from_disk: int = 0
    """Spilled blocks a prefix lookup read back into a slot."""
    disk_evictions: int = 0
    """Spilled blocks dropped from the full disk tier."""


class DiskTier(Protocol):
    """The bytes of the disk tier (runtime/kv_store.py SpillFile): the directory says which
    slot goes where, the implementation copies. False: the copy failed (the block is lost,
    as an eviction without a disk tier)."""

    def write(self, slot: int, disk_slot: int) -> bool: ...

    def read(self, disk_slot: int, slot: int) -> bool: ...


class KVStore:
    """The directory of one pool of `num_slots` slots of `block_size` tokens."""

    def __init__(
        self,
        num_slots: int,
        block_size: int,
        cache_key: str,
        bytes_per_slot: int = 0,
        serves_prefixes: bool = True,
        num_disk_slots: int = 0,
        disk: DiskTier | None = None,
    ) -> None:
        """`serves_prefixes`: a prompt may load prefix blocks from the store (False with
        prefix caching off: every prompt is computed the same way; resumes still work).
        `num_disk_slots`: blocks the disk tier holds (0: none; off without
        `serves_prefixes`, as only prefixes are read back); `disk` copies their bytes
        (None: bookkeeping only, as in the simulator)."""
        self.num_slots, self.block_size = num_slots, block_size
        self.serves_prefixes = serves_prefixes
        self.bytes_per_slot = bytes_per_slot
        self.root = root_hash(cache_key)
        self._free: deque[int] = deque(range(num_slots))
        self._ref = [0] * num_slots
        self._slot_of: dict[BlockHash, int] = {}
        self._name_of: dict[int, BlockHash] = {}
        self._parked: OrderedDict[int, None] = OrderedDict()
        self.num_disk_slots = num_disk_slots if serves_prefixes else 0
        self._disk = disk
        self._on_disk = DiskIndex(self.num_disk_slots)
        self._pinned: set[int] = set()
        """Slots a prefix lookup counted, kept from eviction until the next `plan`."""
        self.entries: dict[str, StoreEntry] = {}
        self.stats = StoreStats()

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free) + len(self._parked)

    @property
    def num_cached_slots(self) -> int:
        """Named slots no live request holds: cache only."""
        return len(self._parked)

    @property
    def num_disk_blocks(self) -> int:
        """Blocks held by the disk tier."""
        return len(self._on_disk)

    def resume_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """The slots holding the KV of a request's first num_tokens - 1 tokens (all but
        the last, whose KV its next decode step computes), or None if the store lacks it."""
        e = self.entries.get(request_id)
        need = num_tokens - 1
        if e is None or e.broken or e.valid < need:
            return None
        n = -(-need // self.block_size)
        slots = e.slots[:n]
        if len(slots) < n or min(slots, default=0) < 0:
            return None
        return slots

    def prefix_blocks(self, req: TokenSequence, first: int, limit: int) -> int:
        """How many of a request's full blocks first, first+1 .. (below `limit`) the
        store holds, in order up to the first it lacks: a scheduler's `remote_prefix`
        (blocks 0 .. first-1 are its instance's own prefix-cache hits). Counted in
        `stats.blocks_loaded` only once the plan reads them. With a disk tier, blocks
        found there are read back into slots first, and the slots counted are pinned until
        the next `plan` (the chain's blocks in memory are pinned before any read-back, and
        its blocks on disk kept there, so that reading back one does not push out another)."""
        if first >= limit or not self.serves_prefixes:
            return 0
        e = self.entries.get(req.request_id) or StoreEntry()  # a look only: keeps no entry
        chain: list[BlockHash] = []
        for i in range(first, limit):
            name = self._name(e, req, i)
            slot = self._slot_of.get(name)
            if slot is None and name not in self._on_disk:
                break
            chain.append(name)
            if slot is not None and self.num_disk_slots:
                self._pinned.add(slot)
        if not self.num_disk_slots:
            return len(chain)
        keep = set(chain)
        for n, name in enumerate(chain):
            slot = self._slot_of.get(name)
            if slot is None and (slot := self._restore(name, keep)) is None:
                return n
            self._pinned.add(slot)
        return len(chain)

    # ---- writing ---------------------------------------------------------------------
    def plan(
        self, plan: StepPlan, requests: Mapping[str, Request]
    ) -> tuple[StepPlan, list[Pending]]:
        """`plan` with the copies that write its new KV through to the store, and what to
        `commit` once the step has returned."""
        writes: list[tuple[int, int, int, int]] = []
        reads: list[tuple[int, int]] = []
        pending: list[Pending] = []
        bs = self.block_size
        # a simulator's plans carry no block tables: its copies are never made (block -1)
        tables = {c.request_id: c.block_table for c in plan.chunks}
        for rid, first, count in plan.loads:  # before any write below can evict them
            loading, e = requests[rid], self.entries.setdefault(rid, StoreEntry())
            for i in range(first, first + count):
                slot = self._slot_of.get(self._name(e, loading, i))
                if slot is None:
                    raise RuntimeError(f"request {rid}: block {i} left the store before its load")
                while len(e.slots) <= i:
                    e.slots.append(-1)
                if e.slots[i] != slot:
                    self._share(e, i, slot)
                table = tables.get(rid, ())
                reads.append((slot, table[i] if i < len(table) else -1))
            self.stats.blocks_loaded += count
        self._pinned.clear()  # the loads hold theirs now
        for chunk in plan.chunks:
            req = requests.get(chunk.request_id)
            ctx = chunk.context_len
            if req is None:
                continue
            table = chunk.block_table
            e = self.entries.setdefault(chunk.request_id, StoreEntry())
            if e.broken or ctx <= e.valid:
                continue
            full: list[tuple[int, BlockHash]] = []
            for i in range(e.valid // bs, (ctx - 1) // bs + 1):
                while len(e.slots) <= i:
                    e.slots.append(-1)
                first, end = max(e.valid, i * bs) - i * bs, min(ctx, (i + 1) * bs) - i * bs
                if end == bs:  # full after this step: maybe in the store already
                    name = self._name(e, req, i)
                    hit = self._slot_of.get(name)
                    if hit is not None:
                        if e.slots[i] != hit:
                            self._share(e, i, hit)
                        continue
                    full.append((i, name))
                if e.slots[i] < 0:
                    slot = self._take()
                    if slot is None:
                        e.broken = True
                        self.stats.broken += 1
                        break
                    self._ref[slot] = 1
                    e.slots[i] = slot
                writes.append((table[i] if i < len(table) else -1, e.slots[i], first, end))
            if not e.broken:
                pending.append(Pending(chunk.request_id, ctx, tuple(full)))
        if writes:
            tokens = sum(end - first for _, _, first, end in writes)
            self.stats.bytes_written += tokens * self.bytes_per_slot // bs
            plan = dataclasses.replace(plan, store_writes=plan.store_writes + tuple(writes))
        if reads:
            plan = dataclasses.replace(plan, store_reads=plan.store_reads + tuple(reads))
        return plan, pending

    def commit(self, pending: list[Pending]) -> None:
        """A step's writes have landed: advance each request's valid tokens and name the
        slots its full blocks filled."""
        for p in pending:
            e = self.entries.get(p.request_id)
            if e is None or e.broken:
                continue
            e.valid = max(e.valid, p.context_len)
            for i, name in p.full:
                slot = e.slots[i]
                if name not in self._slot_of and slot not in self._name_of:
                    self._slot_of[name] = slot
                    self._name_of[slot] = name
                    if name in self._on_disk:  # computed again: the memory copy serves
                        self._on_disk.pop(name)

    def release(self, request_id: str) -> None:
        """The request has ended: its named slots stay as cache, its private ones free."""
        e = self.entries.pop(request_id, None)
        if e is None:
            return
        for slot in e.slots:
            if slot >= 0:
                self._unref(slot)

    def note_resume(self, num_tokens: int) -> None:
        self.stats.resumes += 1
        self.stats.tokens_resumed += num_tokens

    # ---- slots -------------------------------------------------------------------------
    def _name(self, e: StoreEntry, req: TokenSequence, i: int) -> BlockHash:
        bs = self.block_size
        while len(e.names) <= i:
            j = len(e.names)
            parent = e.names[-1] if e.names else self.root
            e.names.append(chain_hash(parent, req.token_ids(j * bs, (j + 1) * bs)))
        return e.names[i]

    def _share(self, e: StoreEntry, i: int, slot: int) -> None:
        """Block i of the entry is the named `slot`: hold it (dropping a private one)."""
        if e.slots[i] >= 0:
            self._unref(e.slots[i])
        if self._ref[slot] == 0:
            del self._parked[slot]
        self._ref[slot] += 1
        e.slots[i] = slot
        self.stats.blocks_shared += 1

    def _take(self, keep: Set[BlockHash] = frozenset()) -> int | None:
        """A free slot, else the least recently released parked one not pinned (spilled
        to the disk tier if there is one, without dropping the names in `keep` from it)."""
        if self._free:
            return self._free.popleft()
        for slot in self._parked:
            if slot not in self._pinned:
                break
        else:
            return None
        del self._parked[slot]
        name = self._name_of.pop(slot)
        del self._slot_of[name]
        self.stats.evictions += 1
        if self.num_disk_slots:
            self._spill(slot, name, keep)
        return slot

    def _spill(self, slot: int, name: BlockHash, keep: Set[BlockHash]) -> None:
        disk = self._on_disk
        if disk.full:
            if not disk.drop_oldest(keep):
                return  # the disk holds only names in `keep`: this block is lost
            self.stats.disk_evictions += 1
        disk_slot = disk.put(name)
        if self._disk is not None and not self._disk.write(slot, disk_slot):
            disk.pop(name)
            return
        self.stats.spilled += 1

    def _restore(self, name: BlockHash, keep: Set[BlockHash]) -> int | None:
        """Read a spilled block back into a slot, parked under its name; None if no slot
        can be had or the read fails. `keep` (with `name`) stays on disk meanwhile."""
        slot = self._take(keep)
        if slot is None:
            return None
        disk_slot = self._on_disk.pop(name)  # free again, but nothing writes it before the read
        if self._disk is not None and not self._disk.read(disk_slot, slot):
            self._free.append(slot)
            return None
        self._slot_of[name], self._name_of[slot] = slot, name
        self._parked[slot] = None
        self.stats.blocks_from_disk += 1
        return slot

    def _unref(self, slot: int) -> None:
        self._ref[slot] -= 1
        if self._ref[slot] > 0:
            return
        if slot in self._name_of:
            self._parked[slot] = None
        else:
            self._free.append(slot)

    # ---- integrity -----------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError unless every slot is in exactly one state and each held
        slot's ref equals the entries holding it."""
        holders = [0] * self.num_slots
        for e in self.entries.values():
            for slot in e.slots:
                if slot >= 0:
                    holders[slot] += 1
        if holders != self._ref:
            bad = [s for s in range(self.num_slots) if holders[s] != self._ref[s]]
            raise AssertionError(f"slots {bad[:5]}: ref counts differ from their holders")
        free, parked = set(self._free), set(self._parked)
        if len(free) != len(self._free) or free & parked:
            raise AssertionError("a slot is free twice, or free and parked")
        for slot in range(self.num_slots):
            states = (slot in free) + (slot in parked) + (self._ref[slot] > 0)
            if states != 1:
                raise AssertionError(f"slot {slot} is in {states} states")
            if (slot in free) and slot in self._name_of:
                raise AssertionError(f"free slot {slot} has a name")
        if parked - set(self._name_of):
            raise AssertionError("a parked slot has no name")
        for name, slot in self._slot_of.items():
            if self._name_of.get(slot) != name:
                raise AssertionError(f"slot {slot}: its name does not map back to it")
        if len(self._name_of) != len(self._slot_of):
            raise AssertionError("two slots have one name")
        self._on_disk.check(self._slot_of)
        if self._pinned - set(self._name_of):
            raise AssertionError("a pinned slot has no name")
