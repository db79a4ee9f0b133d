"""Routing rules, shared by the real cluster and the simulator: prompts go to the
prefill (or colocated) instance where they would be computed soonest, counted in prompt
tokens: those ahead of them (queued or being computed) plus their own that the instance's
prefix cache does not hold (cache-aware: a hit is a saving, a longer queue can outweigh
it); ties go to the fewest running requests. Prefilled requests
go to the decode instance with room in its admission queue and the most free blocks net
of what that queue already claims.

Per request (`PrefillOnDecode`, serve/simulate --prefill-on-decode): a new prompt may
instead be prefilled by a decode instance, which then decodes it with no migration, when
the latency model says it would be decoding sooner there than behind the prefill queue
plus the KV's migration, and the decode step that prefills it (which stalls every request
decoding there) still fits in the TPOT target: a long prompt's never does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from distserve.core.prefix_cache import TokenSequence
from distserve.core.request import RequestStatus
from distserve.core.scheduler import DecodeScheduler, PrefillScheduler, Scheduler


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
    compute (those neither its prefix cache nor a KV store can supply); ties: the fewest
    running requests (decodes a colocated prefill would stall), then the first."""
    alive = [i for i in instances if _open(i)]
    if not alive:
        return None

    def work(i: T) -> tuple[int, int]:
        s = i.scheduler
        if seq is None:
            return s.num_prompt_tokens_ahead, len(s.running)
        hits = len(s.blocks.lookup(seq))
        if s.remote_prefix is not None:  # what a KV store would supply it (core/kv_store.py)
            hits += s.remote_prefix(seq, hits, (seq.num_tokens - 1) // s.blocks.block_size)
        own = seq.num_tokens - hits * s.blocks.block_size
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


class StepCosts(Protocol):
    """What the per-request rule asks of a latency model (sim/latency.py's LatencyModel)."""

    def phase_time(self, prefill: Sequence[tuple[int, int]], decode: Sequence[int]) -> float:
        """Seconds of one step of prompt chunks ((start, tokens) each) and decode contexts."""
        ...

    def transfer_time(self, num_tokens: int) -> float:
        """Seconds to migrate the KV of `num_tokens` tokens."""
        ...


def prefill_on_decode(via_prefill: float, via_decode: float, stall: float, tpot: float) -> bool:
    """The per-request rule: a decode instance prefills a new prompt itself iff the request
    would be decoding sooner that way (`via_decode`: the decode step in flight there plus
    the step that prefills it) than by the prefill instance (`via_prefill`: its queue's
    wait, the prompt's own prefill and the KV's migration), and that step (`stall`: every
    request decoding there waits for it) fits in the TPOT target `tpot`. Seconds, all."""
    return stall <= tpot and via_decode < via_prefill


def _prompt_work(s: Scheduler) -> list[tuple[int, int]]:
    """(start, tokens) of the prompt work ahead on an instance: queued, or being prefilled."""
    work = [(r.num_computed_tokens, r.num_uncomputed_tokens) for r in s.waiting]
    return work + [
        (r.num_computed_tokens, r.num_uncomputed_tokens)
        for r in s.running
        if r.status == RequestStatus.PREFILLING
    ]


def _uncached(s: Scheduler, seq: TokenSequence) -> tuple[int, int]:
    """(start, tokens) of the part of `seq` an instance's prefix cache does not hold."""
    hit = len(s.blocks.lookup(seq)) * s.blocks.block_size
    return hit, seq.num_tokens - hit


@dataclass(frozen=True)
class PrefillOnDecode:
    """The per-request rule with the latency models of both roles and the TPOT target."""

    prefill: StepCosts
    decode: StepCosts
    tpot_slo: float

    def via_prefill(self, inst: Routable, seq: TokenSequence) -> float:
        """When `seq` would be decoding if `inst` (a prefill instance) prefilled it: its
        queue's prompts and this one as a batch, then the migration of this one's KV."""
        s = inst.scheduler
        own = _uncached(s, seq)
        return self.prefill.phase_time([*_prompt_work(s), own], []) + self.decode.transfer_time(
            seq.num_tokens
        )

    def decode_times(self, inst: Routable, seq: TokenSequence) -> tuple[float, float] | None:
        """(via_decode, stall) of `seq` on decode instance `inst`, or None where it has no
        seat or no blocks for it now (it would wait there, not be prefilled at once)."""
        s = inst.scheduler
        if not isinstance(s, DecodeScheduler):
            return None
        seats = len(s.running) + len(s.waiting) + len(s.pending)
        claimed = sum(s.blocks.blocks_for(r.num_tokens) for r in s.waiting)
        room = free_after_queue(s) - claimed - s.blocks.watermark_blocks
        if seats >= s.config.max_num_seqs or room < s.blocks.blocks_for(seq.num_tokens + 1):
            return None
        contexts = [r.num_computed_tokens for r in s.running if r.status == RequestStatus.DECODING]
        stall = self.decode.phase_time([*_prompt_work(s), _uncached(s, seq)], contexts)
        # a decode step may be running: the prefill waits it out
        in_flight = self.decode.phase_time([], contexts) if contexts else 0.0
        return in_flight + stall, stall

    def pick(self, prefill: T | None, decoders: Sequence[T], seq: TokenSequence) -> T | None:
        """The decode instance that should prefill `seq` itself (the one where it would be
        decoding soonest), or None: `prefill`, the instance routing chose, takes it."""
        if prefill is None or not isinstance(prefill.scheduler, PrefillScheduler):
            return None  # colocated: nothing migrates, nothing to save
        via_prefill = self.via_prefill(prefill, seq)
        best, best_t = None, math.inf
        for inst in decoders:
            if not _open(inst):
                continue
            times = self.decode_times(inst, seq)
            if times is None:
                continue
            via_decode, stall = times
            if prefill_on_decode(via_prefill, via_decode, stall, self.tpot_slo) and (
                via_decode < best_t
            ):
                best, best_t = inst, via_decode
        return best
