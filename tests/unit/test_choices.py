"""Several choices per prompt (the API's `n`, cluster/choices.py) without a model: each
choice's seed, the table of choices waiting for their leader, the request bodies' limits,
and that a choice queued after its leader's prefill takes the prompt's full blocks from
the prefix cache (shared, not copied) and computes only the rest."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from distserve.cluster.choices import (
    MAX_CHOICES,
    Held,
    HeldChoices,
    choice_params,
    choice_seed,
    sibling,
)
from distserve.cluster.request_table import RequestState
from distserve.core import (
    BlockManager,
    PrefillScheduler,
    Request,
    SamplingParams,
    SchedulerConfig,
    StepResult,
)
from distserve.server.protocol import ChatCompletionRequest, CompletionRequest


def test_choice_zero_keeps_the_seed_and_the_others_get_distinct_repeatable_ones() -> None:
    assert choice_seed(None, 3) is None
    assert choice_seed(7, 0) == 7
    seeds = [choice_seed(7, k) for k in range(MAX_CHOICES)]
    assert len(set(seeds)) == MAX_CHOICES
    assert seeds == [choice_seed(7, k) for k in range(MAX_CHOICES)]
    assert all(0 <= s < 2**63 for s in seeds if s is not None)
    assert choice_seed(8, 1) not in seeds  # not an offset of the request's seed
    params = SamplingParams(seed=7, temperature=0.8)
    assert choice_params(params, 0) is params
    other = choice_params(params, 2)
    assert other.seed == seeds[2] and other.temperature == 0.8
    assert choice_params(SamplingParams(), 5).seed is None


def _held(rid: str) -> Held:
    req = Request(rid, [1, 2, 3], SamplingParams(), 0.0)
    return Held(RequestState(rid, asyncio.Queue(), None), req)  # type: ignore[arg-type]


def test_held_choices_release_by_leader_and_drop_one() -> None:
    held = HeldChoices()
    for rid in ("a-1", "a-2", "a-3"):
        held.hold("a", _held(rid))
    held.hold("b", _held("b-1"))
    assert len(held) == 4 and "a-2" in held and "a" not in held
    assert held.drop("a-2") is not None and held.drop("a-2") is None
    assert [h.request.request_id for h in held.release("a")] == ["a-1", "a-3"]
    assert held.release("a") == [] and len(held) == 1
    assert held.drop("b-1") is not None and len(held) == 0 and held.all() == []


@pytest.mark.parametrize("cls", [CompletionRequest, ChatCompletionRequest])
def test_n_is_bounded_and_best_of_may_not_be_below_it(cls: type) -> None:
    body = {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    assert cls.model_validate({**body, "n": MAX_CHOICES}).n == MAX_CHOICES
    assert cls.model_validate({**body, "n": 2, "best_of": None}).n == 2
    for bad in ({"n": 0}, {"n": MAX_CHOICES + 1}, {"n": 2, "best_of": 1}):
        with pytest.raises(ValidationError):
            cls.model_validate({**body, **bad})
    with pytest.raises(ValidationError, match="best_of"):
        cls.model_validate({**body, "n": 3, "best_of": 2})


def test_a_choice_queued_after_its_leaders_prefill_shares_the_prompts_full_blocks() -> None:
    blocks = BlockManager(32, 4, prefix_caching=True)
    sched = PrefillScheduler(SchedulerConfig(max_model_len=64), blocks)
    params = SamplingParams(max_tokens=4, seed=3, temperature=1.0)
    leader = Request("r", list(range(10, 21)), params, 0.0)  # 11 tokens: 2 full blocks + 3
    sched.add_request(leader)
    plan = sched.schedule(1.0)
    sched.update(plan, StepResult({"r": 99}), 1.0)
    others = [sibling(leader, f"r-{k}", k) for k in (1, 2)]
    assert {o.sampling_params.seed for o in others} == {choice_seed(3, 1), choice_seed(3, 2)}
    for o in others:
        sched.add_request(o)
    plan = sched.schedule(2.0)
    assert [c.num_tokens for c in plan.chunks] == [3, 3]  # only the partial block runs
    shared = blocks.block_table("r")[:2]
    for o in others:
        assert blocks.block_table(o.request_id)[:2] == shared
        assert o.num_cached_tokens == 8
    sched.update(plan, StepResult({"r-1": 5, "r-2": 6}), 2.0)
    for rid in ("r", "r-1", "r-2"):
        sched.release_migrated(rid, 3.0)
    blocks.check_integrity()
    assert blocks.num_used_blocks == 0
