"""The disk tier's index of the KV store (core/kv_store.py): which spilled block, by name,
sits in which slot of the spill file (runtime/kv_store.py SpillFile), in the order of
spilling, within a capacity of `num_slots` blocks. Bookkeeping only, like the store's
directory: the simulator keeps one too."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection, Set

from distserve.core.prefix_cache import BlockHash


class DiskIndex:
    """`num_slots` disk slots: free, or holding one name (least recently spilled first)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._slot_of: OrderedDict[BlockHash, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    @property
    def full(self) -> bool:
        return not self._free

    def drop_oldest(self, keep: Set[BlockHash] = frozenset()) -> bool:
        """Free the slot of the least recently spilled name not in `keep`; False if there
        is none."""
        victim = next((n for n in self._slot_of if n not in keep), None)
        if victim is None:
            return False
        self.pop(victim)
        return True

    def put(self, name: BlockHash) -> int:
        """A free slot, now `name`'s (the caller makes room first: not `full`)."""
        slot = self._free.popleft()
        self._slot_of[name] = slot
        return slot

    def pop(self, name: BlockHash) -> int:
        """Forget `name`; returns the slot it had, now free."""
        slot = self._slot_of.pop(name)
        self._free.append(slot)
        return slot

    def check(self, in_memory: Collection[BlockHash]) -> None:
        """Raise AssertionError unless every slot is free or one name's, and no name is
        also among `in_memory` (a block lives in one tier)."""
        used = list(self._slot_of.values())
        if sorted(used + list(self._free)) != list(range(self.num_slots)):
            raise AssertionError("a disk slot is lost, or used and free at once")
        if any(name in in_memory for name in self._slot_of):
            raise AssertionError("a name is in memory and on disk")
