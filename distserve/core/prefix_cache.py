"""Prefix caching's bookkeeping: which physical blocks hold the KV of which token prefix.

A full block is named by a hash chained over the tokens of every block up to and
including it, seeded by a namespace key (the model), so equal names mean equal prefixes
under the same model:

    tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t40 ]      (block_size 16)
    names:   [    h0     |     h1     |   (partial: none) ]
    h0 = H(root(key), t0..t15),  h1 = H(h0, t16..t31),  root(key) = H(key)

A request's longest cached prefix is its names looked up in order until the first miss.
H is BLAKE2b with 128-bit digests: a collision (two prefixes sharing a name, so one
request reading another's KV) needs ~2^64 blocks, and the name can later address a KV
store shared across processes, where Python's `hash` (per-process, 64-bit, easy to
collide on purpose) could not.

Only counts and names live here, never tensors; the `BlockManager` is the only caller.
"""

from __future__ import annotations

import hashlib
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

BlockHash = bytes


class TokenSequence(Protocol):
    """What prefix caching reads of a request (a `Request` is one). Its tokens only ever
    grow at the end (prompt, then outputs), so names computed once stay right."""

    @property
    def request_id(self) -> str: ...

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


def root_hash(key: str) -> BlockHash:
    """The name the chain starts from: the model (or any namespace) the KV belongs to."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def chain_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The name of a full block holding `tokens` after the prefix named `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


SharedNames = dict[tuple[BlockHash, int], list[BlockHash]]
"""A sequence's block names per (root, block size)."""

_SHARED: weakref.WeakKeyDictionary[object, SharedNames] = weakref.WeakKeyDictionary()
"""Sequence object -> its block names per (root, block size), shared by every cache that
names it: the instances a router weighs (pp virtual instances, replicas) hash a prompt
once, not once each. The same object's tokens only grow at the end, so a list of names
computed by one cache stays right for all."""


def shared_names(seq: TokenSequence) -> SharedNames:
    """The names every cache keeps for `seq` (to pass to `share_names`)."""
    per_seq = _SHARED.get(seq)
    if per_seq is None:
        per_seq = _SHARED[seq] = {}
    return per_seq


def share_names(seq: TokenSequence, names: SharedNames) -> None:
    """Let `seq` read and extend `names` as its own block names, before any cache names
    it: for sequences that are all prefixes of one token sequence, and stay so as they
    grow (a simulator's requests of one prompt, whose outputs are all one token; a
    request and its handoff copy). Each block is then hashed once for all of them."""
    _SHARED[seq] = names


def _shared_names(seq: TokenSequence, root: BlockHash, block_size: int) -> list[BlockHash]:
    """The shared names list of `seq` under `root` (a fresh private list where `seq`
    cannot be weakly referenced)."""
    try:
        per_seq = shared_names(seq)
    except TypeError:
        return []
    return per_seq.setdefault((root, block_size), [])


class PrefixCache:
    """Names of full blocks, the blocks holding them, and the unreferenced ones in LRU
    order.

    A block is *registered* (has a name here) from when a request's full, computed block
    is cached until it is evicted. A registered block is either in use (the block
    manager's ref count >= 1: never evicted) or *parked* (ref 0: evictable, least
    recently released first). Each name maps to one block and back; a second block with
    the same content (two requests computed it at once) stays unregistered.

    Ownership: the block manager decides when a block is registered, parked, taken back
    (`unpark`) or evicted; this class keeps the maps consistent. It also keeps, per live
    request, the names of its full blocks so far (`names`) and how many of its table's
    blocks it has registered, until the block manager calls `forget`.
    """

    def __init__(self, key: str, block_size: int) -> None:
        self.key = key
        self.block_size = block_size
        self.root = root_hash(key)
        self._block_of: dict[BlockHash, int] = {}
        self._name_of: dict[int, BlockHash] = {}
        self._parked: OrderedDict[int, None] = OrderedDict()
        self._names: dict[str, tuple[TokenSequence, list[BlockHash]]] = {}
        """Request id -> (the sequence object, the names of its full blocks so far)."""
        self._num_registered: dict[str, int] = {}

    # ---- names ---------------------------------------------------------------------
    def names(self, seq: TokenSequence, num_blocks: int, keep: bool = True) -> list[BlockHash]:
        """The names of at least the first `num_blocks` full blocks of `seq` (computed
        once per sequence object, and with `keep`, kept here until `forget`: only for a
        request this cache holds). The returned list is the cache's own: read it."""
        kept = self._names.get(seq.request_id)
        if kept is None or kept[0] is not seq:  # another object: maybe other tokens
            shared = _shared_names(seq, self.root, self.block_size)
            if not keep:
                return self._extended(seq, shared, num_blocks)
            kept = self._names[seq.request_id] = (seq, shared)
        return self._extended(seq, kept[1], num_blocks)

    def _extended(
        self, seq: TokenSequence, names: list[BlockHash], num_blocks: int
    ) -> list[BlockHash]:
        """`names` (of `seq`'s first blocks) extended to at least `num_blocks`."""
        if len(names) >= num_blocks:
            return names
        bs = self.block_size
        parent = names[-1] if names else self.root
        for i in range(len(names), num_blocks):
            parent = chain_hash(parent, seq.token_ids(i * bs, (i + 1) * bs))
            names.append(parent)
        return names

    def match(self, seq: TokenSequence, num_blocks: int) -> list[int]:
        """Registered blocks holding the longest prefix of `seq`'s first `num_blocks`
        full blocks: looked up in order, up to the first name nobody holds."""
        hits: list[int] = []
        # Not kept: a router looks a prompt up on every instance, and the others would
        # keep it (and its request) for ever.
        names = self.names(seq, num_blocks, keep=False)
        block_of = self._block_of
        for i in range(num_blocks):
            block = block_of.get(names[i])
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- registration --------------------------------------------------------------
    def register(self, seq: TokenSequence, table: Sequence[int], num_full: int) -> None:
        """Name the first `num_full` blocks of `seq`'s table (each full and computed).
        Blocks named in an earlier call are skipped, so calling this every step costs
        nothing until a block fills."""
        rid = seq.request_id
        done = self._num_registered.get(rid, 0)
        if num_full <= done:
            return
        block_of, name_of = self._block_of, self._name_of
        names = self.names(seq, num_full)
        for name, block in zip(names[done:num_full], table[done:num_full], strict=True):
            if name not in block_of and block not in name_of:
                block_of[name] = block
                name_of[block] = name
        self._num_registered[rid] = num_full

    def is_registered(self, block: int) -> bool:
        return block in self._name_of

    def forget(self, request_id: str) -> None:
        """Drop what is kept for a request (its names); its blocks stay registered."""
        self._names.pop(request_id, None)
        self._num_registered.pop(request_id, None)

    # ---- parking and eviction ------------------------------------------------------
    def park(self, block: int) -> None:
        """A registered block lost its last holder: evictable, most recently used."""
        self._parked[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is taken again (a prefix hit): no longer evictable."""
        del self._parked[block]

    def is_parked(self, block: int) -> bool:
        return block in self._parked

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def evict(self) -> int:
        """Unregister and return the least recently released parked block."""
        block, _ = self._parked.popitem(last=False)
        del self._block_of[self._name_of.pop(block)]
        return block

    # ---- integrity -----------------------------------------------------------------
    def check(self, refs: Sequence[int], tables: dict[str, list[int]]) -> None:
        """Raise AssertionError unless names and blocks map one to one, parked blocks are
        exactly the registered ones with ref 0, and only live requests have state here."""
        for name, block in self._block_of.items():
            if self._name_of.get(block) != name:
                raise AssertionError(f"block {block}: its name does not map back to it")
        if len(self._name_of) != len(self._block_of):
            raise AssertionError("a block has a name no lookup can reach")
        for block in self._name_of:
            if (refs[block] == 0) != (block in self._parked):
                raise AssertionError(
                    f"registered block {block}: ref {refs[block]}, parked: {block in self._parked}"
                )
        if not set(self._parked) <= set(self._name_of):
            raise AssertionError("a parked block has no name")
        for rid, n in self._num_registered.items():
            if n > len(tables.get(rid, ())) or n > len(self._names.get(rid, (None, []))[1]):
                raise AssertionError(f"request {rid}: {n} blocks registered, beyond its table")
