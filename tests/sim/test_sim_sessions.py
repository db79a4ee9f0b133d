"""Multi-turn sessions in the simulator (`simulate --dataset conversations`): a session's
later turn arrives when the turn before has finished plus its think time, as bench sends
it (closed loop), and prefix caching makes it compute only what the earlier turn did not."""

from __future__ import annotations

import dataclasses

import pytest

from distserve.sim.simulator import Simulator
from distserve.workload import Workload, WorkloadRequest
from tests.sim.test_simulator import _config


def _sessions() -> Workload:
    """Two sessions of three turns; turn k+1's prompt extends turn k's (its answer as the
    dataset has it, then a new message), as workload/conversations.py builds them."""
    reqs = []
    for s, start in enumerate((0.0, 0.3)):
        prompt: list[int] = []
        for turn in range(3):
            prompt = prompt + [(7 * s + 3 * turn + j) % 200 + 1 for j in range(40)]
            nominal = start + 2.0 * turn
            reqs.append(WorkloadRequest(0, nominal, tuple(prompt), 6, s, turn, 0.5 * turn))
    reqs.sort(key=lambda r: r.arrival)
    return Workload(tuple(dataclasses.replace(r, index=i) for i, r in enumerate(reqs)))


@pytest.mark.parametrize("mode", ["disagg", "colocated"])
def test_a_later_turn_arrives_after_the_answer_and_its_think_time(mode: str) -> None:
    wl = _sessions()
    results = Simulator(_config(mode)).run(wl)
    by = {(w.session, w.turn): (w, r) for w, r in zip(wl.requests, results, strict=True)}
    for s in (0, 1):
        for turn in (1, 2):
            w, r = by[(s, turn)]
            prev_w, prev = by[(s, turn - 1)]
            assert prev.e2e is not None and r.e2e is not None
            assert r.arrival == pytest.approx(prev.arrival + prev.e2e + w.think_time)
            assert r.arrival != pytest.approx(w.arrival)  # not the nominal time
            # the earlier turn's full 16-token blocks are cached (its last token is not)
            assert r.cached_tokens == (prev_w.prompt_len // 16) * 16
    assert by[(1, 0)][1].arrival == 0.3  # a first turn arrives at its own time


def test_a_prompt_routed_away_from_its_prefix_loads_it_from_the_kv_store() -> None:
    """Colocated x2: A's prompt P is computed on instance 0; B keeps instance 0 busy, so C
    (P plus more) goes to instance 1, which finds P's blocks in the store (loaded, not
    computed) with a store, and computes all of C without one."""
    p = tuple(range(1, 161))  # 10 full blocks
    wl = Workload(
        (
            WorkloadRequest(0, 0.0, p, 2),
            WorkloadRequest(1, 0.5, tuple(range(200, 600)), 2),
            WorkloadRequest(2, 0.51, p + tuple(range(700, 732)), 2),
        )
    )
    runs = {}
    for slots in (0, 64):
        sim = Simulator(dataclasses.replace(_config("colocated"), kv_store_slots=slots))
        runs[slots] = sim.run(wl)
        if sim.store is not None:
            assert sim.store.stats.blocks_loaded == 10
            sim.store.check()
            assert sim.store.num_free_slots == 64  # every request released its slots
    assert runs[0][2].cached_tokens == 0 and runs[64][2].cached_tokens == 160
    assert runs[64][2].ttft == pytest.approx(runs[0][2].ttft - 0.160)  # 1 ms a token less


def test_a_prefix_pushed_out_to_the_store_s_disk_tier_is_loaded_back() -> None:
    """simulate --kv-store-disk-gb: one colocated instance with room for 14 blocks and a
    store of 12 slots. B pushes A's prompt P out of both (the store spills it); C (P plus
    more) finds P on the store's disk and loads it, where without a disk tier it computes
    what the instance's own cache lost."""
    p = tuple(range(1, 161))  # 10 full blocks
    wl = Workload(
        (
            WorkloadRequest(0, 0.0, p, 2),
            WorkloadRequest(1, 5.0, tuple(range(200, 360)), 2),
            WorkloadRequest(2, 10.0, p + tuple(range(700, 732)), 2),
        )
    )
    cached = {}
    for disk in (0, 40):
        config = dataclasses.replace(
            _config("colocated"), num_blocks=dict.fromkeys(("prefill", "decode", "colocated"), 14),
            kv_store_slots=12, kv_store_disk_slots=disk,
        )  # fmt: skip
        sim = Simulator(config)
        cached[disk] = sim.run(wl)[2].cached_tokens
        assert sim.store is not None
        sim.store.check()
        assert sim.store.stats.blocks_from_disk == (9 if disk else 0)  # block 9 was in memory
    assert cached[0] < cached[40] == 160  # without: only what the instance's cache kept
