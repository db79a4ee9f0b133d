"""The core's fast paths for the simulator give what the plain paths give: a counted chunk
equals the constructor's, a prompt weighed by several instances' prefix caches is hashed
once (and named the same by each), and a decode step that needs no new block allocates
nothing while one that does still preempts."""

from __future__ import annotations

import distserve.core.prefix_cache as pc
from distserve.core import BlockManager, DecodeScheduler, Request, SamplingParams, SchedulerConfig
from distserve.core.plan import ScheduledChunk
from distserve.core.request import RequestStatus


def test_counted_chunk_equals_constructed() -> None:
    sp = SamplingParams(max_tokens=4)
    made = ScheduledChunk("7", (), 40, (), sp, output_index=3, num_tokens=1)
    fast = ScheduledChunk.counted("7", 40, 1, sp, 3)
    assert fast == made and hash(fast) == hash(made)
    assert (fast.context_len, fast.is_prefill, fast.allowed_tokens) == (41, False, None)


def test_a_prompt_is_hashed_once_across_caches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    real = pc.chain_hash

    def counting(parent, tokens):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(parent, tokens)

    monkeypatch.setattr(pc, "chain_hash", counting)
    req = Request("r", list(range(70)), SamplingParams(max_tokens=2), 0.0)
    managers = [BlockManager(64, 16, prefix_caching=True, cache_key="m") for _ in range(4)]
    names = [bm.cache.names(req, 4)[:4] for bm in managers if bm.cache is not None]
    assert len(calls) == 4  # one per block, not per cache
    assert all(n == names[0] for n in names)
    other = BlockManager(64, 16, prefix_caching=True, cache_key="other-model")
    assert other.cache is not None and other.cache.names(req, 4)[0] != names[0][0]
    copy = Request("r", list(range(70)), SamplingParams(max_tokens=2), 0.0)
    assert managers[0].cache is not None and managers[0].cache.names(copy, 4)[:4] == names[0]


def _decoding(rid: str, prompt: int, bm: BlockManager) -> Request:
    req = Request(rid, list(range(prompt)), SamplingParams(max_tokens=100), 0.0)
    req.output_token_ids.append(1)
    req.num_computed_tokens = req.num_tokens - 1
    req.status = RequestStatus.DECODING
    bm.allocate(rid, req.num_tokens)
    return req


def test_decode_step_allocates_only_at_block_boundaries_and_still_preempts() -> None:
    bm = BlockManager(4, 16)
    sched = DecodeScheduler(SchedulerConfig(max_num_seqs=8), bm)
    a, b = _decoding("a", 20, bm), _decoding("b", 31, bm)  # 2 blocks each: none free
    for r in (a, b):
        sched.requests[r.request_id] = r
        sched.running.append(r)
    plan = sched.schedule(0.0)  # a: 21 tokens fit; b: 32 tokens fit
    assert [c.request_id for c in plan.chunks] == ["a", "b"] and bm.num_free_blocks == 0
    b.output_token_ids.append(1)
    b.num_computed_tokens += 1
    a.output_token_ids.append(1)
    a.num_computed_tokens += 1
    plan = sched.schedule(0.1)  # b needs a 3rd block: the newest (b itself) is preempted
    assert [c.request_id for c in plan.chunks] == ["a"]
    assert sched.num_preemptions == 1 and b.status == RequestStatus.WAITING
