"""Where a request goes: prompts to the least-loaded prefill (or colocated) instance,
prefilled requests to the decode instance with the most free blocks that can take them."""

from __future__ import annotations

from collections.abc import Sequence

from distserve.core import DecodeScheduler
from distserve.runtime.instance import Instance


def pick_prefill(instances: Sequence[Instance]) -> Instance | None:
    """The live instance with the fewest queued prompt tokens (ties: the first)."""
    alive = [i for i in instances if i.alive]
    return min(alive, key=lambda i: i.scheduler.num_queued_tokens) if alive else None


def pick_decode(instances: Sequence[Instance]) -> Instance | None:
    """The live decode instance with room in its admission queue and the most free blocks
    net of what its queue already claims; None if all are full."""

    def free_after_queue(inst: Instance) -> int:
        sched = inst.scheduler
        assert isinstance(sched, DecodeScheduler)
        claimed = sum(sched.blocks.blocks_for(r.num_tokens) for r in sched.pending)
        return sched.blocks.num_free_blocks - claimed

    ready = [
        i
        for i in instances
        if i.alive and isinstance(i.scheduler, DecodeScheduler) and i.scheduler.can_accept()
    ]
    return max(ready, key=free_after_queue) if ready else None
