"""Algorithm 2 (low node-affinity): prefill and decode stages of the same layers share a
node, decode runs on the decode profiles, and the choice is the best unit of its space."""

from __future__ import annotations

import itertools

from distserve.core import SchedulerConfig
from distserve.planner.low_affinity import algorithm2, copies_that_fit, segment_devices, units
from distserve.planner.phases import InstanceConfig, Setting, placement_goodput
from distserve.planner.plan import make_plan
from distserve.planner.search import Cluster
from distserve.sim.profile import Profile
from distserve.workload.build import WorkloadSpec, build_workload

MODEL = "opt-13b"  # 40 layers, 40 heads: pipeline degrees 1, 2, 4, 5, ...


def _profiles(hardware: str, prefill: float, decode: float) -> list[Profile]:
    return [
        Profile(
            MODEL,
            hardware,
            tp=tp,
            prefill=(0.01, prefill / tp**0.9, 0.0),
            decode_small=(0.01 * decode / tp**0.3, 1e-6, 1e-4 * decode),
            decode_large=(0.01 * decode / tp**0.3, 1e-6, 1e-4 * decode),
            kv_capacity_tokens=20_000 * tp,
        )
        for tp in (1, 2, 4)
    ]


# prefill on fast-compute devices, decode on another kind (as --profile-decode gives)
PREFILL = _profiles("compute", prefill=2e-4, decode=2.0)
DECODE = _profiles("memory", prefill=8e-4, decode=0.5)


def _setting() -> Setting:
    spec = WorkloadSpec(
        dataset="fixed",
        num_requests=60,
        rate=1.0,
        seed=3,
        prompt_len=(64, 512),
        output_len=(4, 48),
    )
    capacity = {(MODEL, p.tp, pp): 20_000 * p.tp * pp for p in PREFILL for pp in (2, 4)}
    return Setting(
        build_workload(spec, tokenizer=None),  # type: ignore[arg-type]
        ttft_slo=0.1,
        tpot_slo=0.03,
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=2048),
        capacity=capacity,
        min_requests=30,
    )


def test_a_stage_of_prefill_and_decode_shares_a_node() -> None:
    cluster = Cluster(num_nodes=2, devices_per_node=3)
    found = units(PREFILL, DECODE, cluster)
    assert found, "some unit fits"
    for pre, dec in found:
        assert pre.profile.hardware == "compute" and dec.profile.hardware == "memory"
        assert pre.pp == dec.pp <= cluster.num_nodes  # one stage of each per node
        assert pre.profile.tp + dec.profile.tp == segment_devices((pre, dec)) <= 3
    # every such pair is there: tp 1+1, 1+2, 2+1 at pp 1 and 2
    expected = {
        (p.tp, d.tp, pp)
        for p, d, pp in itertools.product(PREFILL, DECODE, (1, 2))
        if p.tp + d.tp <= 3
    }
    assert {(p.profile.tp, d.profile.tp, p.pp) for p, d in found} == expected
    assert {p.pp for p, _ in units(PREFILL, DECODE, cluster, max_pp=1)} == {1}


def test_copies_are_counted_by_segments_per_node() -> None:
    """4 nodes of 8 GPUs and 3-GPU segments: 2 segments per node, not 32 // 3."""
    cluster = Cluster(num_nodes=4, devices_per_node=8)
    tp1, tp2 = PREFILL[0], DECODE[1]
    assert copies_that_fit((InstanceConfig(tp1), InstanceConfig(tp2)), cluster) == 8
    assert copies_that_fit((InstanceConfig(tp1, 2), InstanceConfig(tp2, 2)), cluster) == 4
    # 3 stages over 4 nodes: 8 segment slots hold 2 copies
    assert copies_that_fit((InstanceConfig(tp1, 3), InstanceConfig(tp2, 3)), cluster) == 2


def test_the_choice_is_the_best_unit_of_an_exhaustive_search() -> None:
    setting, cluster = _setting(), Cluster(num_nodes=2, devices_per_node=3)
    choice, table = algorithm2(setting, PREFILL, DECODE, cluster, None, 1, None)
    # exhaustive under the same constraint: every pair whose stage segments fit a node,
    # simulated jointly, the best goodput per device
    scores = []
    for p, d, pp in itertools.product(PREFILL, DECODE, (1, 2)):
        if p.tp + d.tp <= cluster.devices_per_node:
            pre, dec = InstanceConfig(p, pp), InstanceConfig(d, pp)
            scores.append((pre, dec, placement_goodput(setting, pre, dec)))
    assert sorted(table.values()) == sorted(g for _, _, g in scores)
    pre, dec, g = max(scores, key=lambda s: s[2] / (s[0].devices + s[1].devices))
    assert g > 0
    assert choice is not None and (choice.prefill, choice.decode) == (pre, dec)
    copies = copies_that_fit((pre, dec), cluster)
    assert (choice.num_prefill, choice.num_decode) == (copies, copies)
    assert choice.goodput == copies * g


def test_a_low_affinity_plan_runs_decode_on_the_decode_profiles() -> None:
    plan = make_plan(_setting(), PREFILL, DECODE, Cluster(2, 3), affinity="low", workers=1)
    disagg = plan["disagg"]
    assert disagg["prefill"]["profile"]["hardware"] == "compute"
    assert disagg["decode"]["profile"]["hardware"] == "memory"
    assert plan["affinity"] == "low" and disagg["devices"] <= 6
