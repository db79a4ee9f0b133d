"""The routing rule shared by the real cluster and the simulator."""

from __future__ import annotations

from dataclasses import dataclass

from distserve.core import BlockManager, ColocatedScheduler, Request, SamplingParams, StepResult
from distserve.core import SchedulerConfig as Cfg
from distserve.core.routing import pick_prefill


@dataclass
class Inst:
    name: str
    scheduler: ColocatedScheduler
    alive: bool = True


def inst(name: str) -> Inst:
    return Inst(name, ColocatedScheduler(Cfg(max_model_len=64), BlockManager(64, 4)))


def req(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=8, ignore_eos=True), 0.0)


def test_a_prompt_being_computed_counts_as_load() -> None:
    """A prompt arriving while instance a computes another (its queue empty again) goes
    to the idle instance b, not behind a's prefill."""
    a, b = inst("a"), inst("b")
    a.scheduler.add_request(req("x", 20))
    a.scheduler.schedule(0.0)  # the prefill of x is in flight
    assert a.scheduler.num_queued_tokens == 0
    assert a.scheduler.num_prompt_tokens_ahead == 20
    assert pick_prefill([a, b]) is b


def test_ties_go_to_the_instance_with_fewer_running_requests() -> None:
    a, b = inst("a"), inst("b")
    b.scheduler.add_request(req("y", 8))
    plan = b.scheduler.schedule(0.0)
    b.scheduler.update(plan, StepResult(sampled={"y": 5}), 0.1)  # y now decodes on b
    assert b.scheduler.num_prompt_tokens_ahead == 0
    assert pick_prefill([b, a]) is a
    assert pick_prefill([a, b]) is a
    a.alive = False
    assert pick_prefill([a, b]) is b


def cached_inst(name: str) -> Inst:
    blocks = BlockManager(64, 4, prefix_caching=True)
    return Inst(name, ColocatedScheduler(Cfg(max_model_len=64), blocks))


def test_a_prompt_goes_where_its_prefix_is_cached_unless_the_queue_outweighs_it() -> None:
    a, b = cached_inst("a"), cached_inst("b")
    first = req("x", 24)
    b.scheduler.add_request(first)
    plan = b.scheduler.schedule(0.0)
    b.scheduler.update(plan, StepResult(sampled={"x": 5}), 0.1)  # x's 6 full blocks cached on b
    again = req("y", 24)  # the same 24 tokens: 20 of them (5 blocks) cached on b
    assert len(b.scheduler.blocks.lookup(again)) == 5 and not a.scheduler.blocks.lookup(again)
    assert pick_prefill([a, b]) is a  # by load alone (b runs x)
    assert pick_prefill([a, b], again) is b  # 4 tokens to compute on b against 24 on a
    b.scheduler.add_request(req("w", 30))
    a.scheduler.add_request(req("z", 12))
    assert pick_prefill([a, b], again) is b  # b: 30 ahead + 4 own = 34; a: 12 + 24 = 36
    b.scheduler.add_request(req("v", 8))  # b: 38 + 4 = 42: the queue outweighs the hit
    assert pick_prefill([a, b], again) is a


def test_weighing_a_prompt_leaves_nothing_on_the_instances_not_chosen() -> None:
    """The router looks every prompt up in every instance's prefix cache; an instance
    that did not take the request keeps nothing of it (it kept the request object, and
    so its tokens, for as long as the server ran)."""
    insts = [cached_inst(n) for n in "abc"]
    for i in range(12):
        r = req(f"r{i}", 4 + i)
        chosen = pick_prefill(insts, r)
        assert chosen is not None
        chosen.scheduler.add_request(r)
        plan = chosen.scheduler.schedule(float(i))
        chosen.scheduler.update(plan, StepResult(sampled={r.request_id: 5}), float(i))
        chosen.scheduler.abort_request(r.request_id, float(i))
    for i in insts:
        assert not i.scheduler.requests
        assert not i.scheduler.blocks.cache._names  # type: ignore[union-attr]
