"""Routing rules, shared by the real cluster and the simulator: prompts go to the
prefill (or colocated) instance where they would be computed soonest, counted in prompt
tokens: those ahead of them (queued or being computed) plus their own that the instance's
prefix cache does not hold (cache-aware: a hit is a saving, a longer queue can outweigh
it); ties go to the fewest running requests. Prefilled requests
go to the decode instance with room in its admission queue and the most free blocks net
of what that queue already claims."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from distserve.core.prefix_cache import TokenSequence
from distserve.core.scheduler import DecodeScheduler, Scheduler


class Routable(Protocol):
    """An instance as routing sees it."""

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def alive(self) -> bool: ...


def _open(inst: Routable) -> bool:
    """Live and taking new work: an instance flipping its role (`draining`, set by the
    controller's cluster/flip.py; the simulator's instances have no such state) does not."""
    return inst.alive and not getattr(inst, "draining", False)


T = TypeVar("T", bound=Routable)


def pick_prefill(instances: Sequence[T], seq: TokenSequence | None = None) -> T | None:
    """The live instance with the fewest prompt tokens ahead (queued, or in a prefill
    running now) plus, given the request `seq`, its own tokens that instance would have to
    compute (those its prefix cache lacks); ties: the fewest running requests (decodes a
    colocated prefill would stall), then the first."""
    alive = [i for i in instances if _open(i)]
    if not alive:
        return None

    def work(i: T) -> tuple[int, int]:
        s = i.scheduler
        own = 0 if seq is None else seq.num_tokens - len(s.blocks.lookup(seq)) * s.blocks.block_size
        return s.num_prompt_tokens_ahead + own, len(s.running)

    return min(alive, key=work)


def free_after_queue(sched: DecodeScheduler) -> int:
    """Free blocks minus what the admission queue will claim."""
    claimed = sum(sched.blocks.blocks_for(r.num_tokens) for r in sched.pending)
    return sched.blocks.num_free_blocks - claimed


def pick_decode(instances: Sequence[T]) -> T | None:
    """The live decode instance that can queue one more request and has the most free
    blocks after its queue; None if all are full."""
    ready = [
        i
        for i in instances
        if _open(i) and isinstance(i.scheduler, DecodeScheduler) and i.scheduler.can_accept()
    ]
    return max(ready, key=lambda i: free_after_queue(i.scheduler)) if ready else None  # type: ignore[arg-type]
