"""The simulator under the per-request rule (SimConfig.prefill_on_decode, simulate
--prefill-on-decode): behind a long prefill queue, short prompts are prefilled by the
decode instance and never migrate; long ones always go through the prefill instance."""

from __future__ import annotations

import dataclasses

from distserve.config import PlacementConfig
from distserve.sim.profile import bundled_a100, find
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.simulator import Simulator
from distserve.workload import Workload, WorkloadRequest

TPOT = 0.1


def workload() -> tuple[Workload, set[int], set[int]]:
    """20 long prompts at once (a prefill queue of seconds), then short and long prompts
    interleaved while it drains; returns the workload and the short and long indices."""
    reqs, short, long = [], set(), set()
    for i in range(20):
        reqs.append((0.0, 1500, 20))
        long.add(i)
    for k in range(30):
        i = len(reqs)
        if k % 3 == 2:
            reqs.append((0.1 + 0.05 * k, 1200, 20))
            long.add(i)
        else:
            reqs.append((0.1 + 0.05 * k, 40 + 3 * k, 20))
            short.add(i)
    wl = Workload(
        tuple(
            WorkloadRequest(i, t, tuple((7 * i + j) % 5000 + 1 for j in range(p)), o)
            for i, (t, p, o) in enumerate(reqs)
        )
    )
    return wl, short, long


def simulator(rule: bool) -> Simulator:
    profile = find(bundled_a100(), "opt-13b", 1)
    config = sim_config(PlacementConfig(mode="disagg"), profile, None, SimOptions())
    return Simulator(dataclasses.replace(config, prefill_on_decode=TPOT if rule else None))


def migrated(res) -> bool:  # type: ignore[no-untyped-def]
    return "migration_start" in res.server


def test_short_prompts_behind_a_long_prefill_queue_go_to_decode_long_ones_never() -> None:
    wl, short, long = workload()
    sim = simulator(rule=True)
    results = sim.run(wl)
    assert all(r.e2e is not None and r.num_tokens == 20 for r in results)
    assert not any(migrated(results[i]) for i in short)
    assert all(migrated(results[i]) for i in long)
    assert sim.prefilled_on_decode == len(short)

    base = simulator(rule=False)
    plain = base.run(wl)
    assert all(migrated(r) for r in plain) and base.prefilled_on_decode == 0
    # the short ones no longer wait behind the long prompts for their first token
    worst = max(results[i].ttft for i in short)
    assert worst < min(plain[i].ttft for i in short)
