"""Adaptive re-planning in the simulator (SimConfig.adaptive, simulate --adaptive): the
controller's policy (sim/replan.py) on the virtual clock, with drain-then-swap role flips.
A mix shifting from short prompts at a high rate to long ones flips 1P1D to colocated
once, after the shift, and never back; no request is lost or cut short."""

from __future__ import annotations

import dataclasses
import random

import pytest

from distserve.config import PlacementConfig
from distserve.metrics.results import RequestResult
from distserve.sim.profile import bundled_a100, find
from distserve.sim.replan import AdaptiveConfig, Hysteresis, flip_refusal, next_flip, predict
from distserve.sim.run import SimOptions, sim_config
from distserve.sim.serving_path import ServingPath
from distserve.sim.simulator import SimConfig, Simulator
from distserve.workload import Workload, WorkloadRequest

TTFT, TPOT = 0.3, 0.06
SHIFT = 8.0
"""When the mix shifts from short prompts to long ones (s)."""


def shifting() -> Workload:
    """8 s of short prompts at 40 req/s (code-like), then 24 s of long ones at 4 req/s
    (summarization-like): adaptive_shift.py's phases, shorter, and the long prompts
    short enough that no output is cut by the model length (2,048)."""
    rng, reqs = random.Random(0), []
    for start, end, rate, plen, olen in (
        (0.0, SHIFT, 40.0, (50, 200), (20, 60)),
        (SHIFT, SHIFT + 24.0, 4.0, (1500, 1850), (50, 150)),
    ):
        t = start + rng.expovariate(rate)
        while t < end:
            ids = tuple(rng.randrange(100, 250) for _ in range(rng.randint(*plen)))
            reqs.append(WorkloadRequest(len(reqs), t, ids, rng.randint(*olen)))
            t += rng.expovariate(rate)
    return Workload(tuple(reqs))


def config(adaptive: bool) -> SimConfig:
    """1P1D of OPT-13B on A100s; adaptive: re-plans every 2 s on a 10 s window."""
    profile = find(bundled_a100(), "opt-13b", 1)
    cfg = sim_config(PlacementConfig(mode="disagg"), profile, None, SimOptions())
    if not adaptive:
        return cfg
    replan = AdaptiveConfig("a100", TTFT, TPOT, interval=2.0, dwell=4.0, max_requests=60)
    return dataclasses.replace(cfg, adaptive=replan, live_window=10.0)


def attained(results: list[RequestResult], after: float) -> float:
    late = [r for r in results if r.arrival >= after]
    return sum(r.ttft <= TTFT and r.tpot <= TPOT for r in late) / len(late)  # type: ignore[operator]


def test_a_shift_to_long_prompts_flips_1p1d_to_colocated_once_and_loses_nothing() -> None:
    wl = shifting()
    fixed = Simulator(config(adaptive=False)).run(wl)
    sim = Simulator(config(adaptive=True))
    results = sim.run(wl)
    # nothing lost or cut short across the flips
    assert all(r.e2e is not None and r.num_tokens == r.output_len for r in results)
    assert all(not i.scheduler.has_unfinished() for i in sim.instances)
    # one layout switch, after the shift; each instance flipped once, no flip back
    assert sim.adaptive is not None
    switches = [r for r in sim.adaptive.replans if r["switch"] is not None]
    assert [r["switch"] for r in switches] == [(0, 0, 2, 0)]
    assert switches[0]["at"] > SHIFT
    assert sorted((f["old"], f["new"]) for f in sim.flips) == [
        ("decode", "colocated"),
        ("prefill", "colocated"),
    ]
    assert [i.role for i in sim.instances] == ["colocated", "colocated"]
    assert len(sim.adaptive.replans) > len(switches)  # it kept re-planning, and stayed
    # the switch pays: the long phase attains more than under the fixed 1P1D
    assert attained(results, SHIFT + 10.0) > attained(fixed, SHIFT + 10.0) + 0.1


def test_the_switch_rule_needs_the_margin_and_the_dwell() -> None:
    h = Hysteresis(margin=0.05, dwell=10.0)
    now, better = (1, 1, 0, 0), (0, 0, 2, 0)
    assert h.decide({now: 0.8, better: 0.84}, now, 0.0) is None  # within the margin
    assert h.candidate is None
    assert h.decide({now: 0.8, better: 0.9}, now, 1.0) is None and h.candidate == better
    assert h.decide({now: 0.8, better: 0.9}, now, 5.0) is None  # dwell not over
    assert h.decide({now: 0.8, better: 0.82}, now, 8.0) is None  # the lead fell: restart
    assert h.decide({now: 0.8, better: 0.9}, now, 9.0) is None and h.since == 9.0
    assert h.decide({now: 0.8, better: 0.9}, now, 19.0) == better
    assert h.candidate is None
    assert h.decide({now: 0.9, better: 0.9}, better, 20.0) is None  # a tie keeps the current


def test_a_near_tie_prefers_the_layout_reached_in_place() -> None:
    h = Hysteresis(margin=0.05, dwell=0.0)
    now, split, chunked = (0, 0, 2, 0), (1, 1, 0, 0), (0, 0, 0, 2)
    # 1P1D predicts 0.3 points more, within the margin: chunked prefill, switched on in
    # place, is as good, and no instance drains
    assert h.decide({now: 0.1, split: 0.978, chunked: 0.975}, now, 0.0) == chunked
    assert h.decide({now: 0.1, split: 0.978, chunked: 0.9}, now, 0.0) == split
    assert h.decide({now: 0.95, split: 0.978, chunked: 0.975}, now, 0.0) is None


def test_the_window_replays_what_arrived_not_only_what_finished() -> None:
    """Under overload few requests finish within the window: the simulator's re-plans, as
    the controller's (cluster/live.py), replay every request that arrived, finished or
    not (sim/replan.py's window_workload), so the first re-plan comes on time and sees
    them all."""
    wl = Workload(
        tuple(WorkloadRequest(i, 0.1 * i, tuple([7] * 1800), 100) for i in range(60))
    )  # 10 req/s of long prompts for 6 s: far more than two instances prefill
    profile = find(bundled_a100(), "opt-13b", 1)
    cfg = sim_config(PlacementConfig(mode="colocated"), profile, None, SimOptions())
    replan = AdaptiveConfig("a100", TTFT, TPOT, interval=2.0, dwell=60.0, min_requests=5)
    sim = Simulator(dataclasses.replace(cfg, adaptive=replan, live_window=10.0))
    results = sim.run(wl)
    assert sim.adaptive is not None
    first = sim.adaptive.replans[0]
    done = sum(r.arrival + r.e2e <= 2.0 for r in results)  # type: ignore[operator]
    assert first["at"] == 2.0 and done < 5  # the finished ones alone: no re-plan yet
    assert first["requests"] == sum(r.arrival <= 2.0 for r in results)
    assert all(r["requests"] == sum(w.arrival <= r["at"] for w in wl.requests)
               for r in sim.adaptive.replans if r["at"] <= 10.0)  # fmt: skip


def test_replans_predict_on_the_simulated_serving_path() -> None:
    """The simulated deployment's steps take 4 ms beyond the model: its re-plans predict
    on that serving path (as the controller's on the overhead it measures), unless
    AdaptiveConfig.step_overhead says otherwise; the runs are the same up to the first
    re-plan, whose predictions are then lower with the overhead than without."""
    profile = find(bundled_a100(), "opt-13b", 1)
    opts = SimOptions(path=ServingPath(step_overhead=0.004))
    first = {}
    for overhead in (None, 0.0):
        replan = AdaptiveConfig("a100", TTFT, TPOT, interval=2.0, step_overhead=overhead)
        cfg = sim_config(PlacementConfig(mode="disagg"), profile, None, opts)
        sim = Simulator(dataclasses.replace(cfg, adaptive=replan, live_window=10.0))
        sim.run(shifting())
        assert sim.adaptive is not None
        assert sim.adaptive.path.step_overhead == (0.004 if overhead is None else 0.0)
        first[overhead] = sim.adaptive.replans[0]["predicted"]
    aware, blind = first[None], first[0.0]
    assert aware.keys() == blind.keys()
    assert all(aware[k] <= blind[k] for k in aware)
    assert any(aware[k] < blind[k] for k in aware)


def test_flips_go_one_at_a_time_and_never_leave_a_role_without_an_instance() -> None:
    assert flip_refusal(["decode"], "decode") == "leaves no instance for prompts"
    assert flip_refusal(["colocated"], "prefill") == "leaves prefill without decode"
    assert flip_refusal(["colocated"], "prefill", force=True) is None

    def ok(roles: list[str]):  # type: ignore[no-untyped-def]
        return lambda i, r: flip_refusal(roles[:i] + roles[i + 1 :], r) is None

    roles = ["colocated", "colocated"]
    assert next_flip(roles, (1, 1, 0, 0), ok(roles)) == (0, "decode")  # prefill first is refused
    roles = ["decode", "colocated"]
    assert next_flip(roles, (1, 1, 0, 0), ok(roles)) == (1, "prefill")
    assert next_flip(["decode", "prefill"], (1, 1, 0, 0), ok(roles)) is None
    roles = ["prefill", "decode"]
    assert next_flip(roles, (0, 0, 2, 0), ok(roles)) == (0, "colocated")
    with pytest.raises(RuntimeError, match="no flip leads"):
        next_flip(["decode"], (0, 0, 1, 0), lambda i, r: False)


def test_a_refused_flip_says_why() -> None:
    sim = Simulator(config(adaptive=False))
    prefill, decode = sim.instances
    with pytest.raises(ValueError, match="leaves no instance for prompts"):
        sim.flip(prefill, "decode", 0.0)
    with pytest.raises(ValueError, match="has that role"):
        sim.flip(decode, "decode", 0.0)


def burst(n: int, prompt: int, output: int) -> Workload:
    return Workload(
        tuple(
            WorkloadRequest(
                i, 0.01 * i, tuple((7 * i + j) % 5000 + 1 for j in range(prompt)), output
            )
            for i in range(n)
        )
    )


@pytest.mark.parametrize(
    ("placement", "index", "role", "wl", "blocks"),
    [  # prompts queued on a colocated instance; prefilled requests pending on a decode one
        (PlacementConfig(mode="colocated", num_instances=2), 0, "decode", burst(60, 600, 40), 200),
        (PlacementConfig(mode="disagg", num_decode=2), 1, "prefill", burst(60, 100, 200), 60),
    ],
)
def test_a_flip_under_load_hands_its_queue_over_and_loses_nothing(
    placement: PlacementConfig, index: int, role: str, wl: Workload, blocks: int
) -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    cfg = sim_config(placement, profile, None, SimOptions(num_blocks=blocks))
    sim = Simulator(cfg)
    inst = sim.instances[index]
    sim._at(1.0, "flip", lambda t: sim.flip(inst, role, t))  # noqa: SLF001
    results = sim.run(wl)
    assert all(r.e2e is not None and r.num_tokens == r.output_len for r in results)
    assert [f["new"] for f in sim.flips] == [role] and inst.role == role
    assert sim.flips[0]["moved"] > 0  # queued work went to another instance
    assert sim.flips[0]["seconds"] > 0  # what it was computing finished first
    assert all(not i.scheduler.has_unfinished() for i in sim.instances)


# ---- chunked prefill as a layout: colocated instances switch their policy in place ----


def phases(*spec: tuple[float, float, tuple[int, int], tuple[int, int]]) -> Workload:
    """Poisson phases (seconds, rate, prompt lengths, output lengths), one after another."""
    rng, reqs, t0 = random.Random(0), [], 0.0
    for seconds, rate, plen, olen in spec:
        t = t0 + rng.expovariate(rate)
        while t < t0 + seconds:
            ids = tuple(rng.randrange(100, 250) for _ in range(rng.randint(*plen)))
            reqs.append(WorkloadRequest(len(reqs), t, ids, rng.randint(*olen)))
            t += rng.expovariate(rate)
        t0 += seconds
    return Workload(tuple(reqs))


LONG = (2.5, (1500, 1850), (50, 150))
"""Summarization-like: adaptive_shift.py's long phase (colocated attains best)."""
SHORT = (50.0, (50, 200), (20, 60))
"""Code-like at a high rate: adaptive_shift.py's short phase (chunked attains best)."""


def test_a_window_of_short_prompts_at_a_high_rate_predicts_chunked_best() -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    blocks = profile.kv_capacity_tokens // 16  # type: ignore[operator]
    window = phases((6.0, *SHORT))
    predicted = predict(window, profile, blocks, TTFT, TPOT, 2, chunk=512)
    assert set(predicted) == {(0, 0, 2, 0), (0, 0, 0, 2), (1, 1, 0, 0)}
    assert max(predicted, key=predicted.__getitem__) == (0, 0, 0, 2)
    assert predicted[(0, 0, 0, 2)] > predicted[(0, 0, 2, 0)] + 0.05
    assert Hysteresis(0.05, 0.0).decide(predicted, (0, 0, 2, 0), 0.0) == (0, 0, 0, 2)
    assert (0, 0, 0, 2) not in predict(window, profile, blocks, TTFT, TPOT, 2)  # chunk 0: never


def test_a_layout_at_the_edge_of_its_capacity_is_judged_by_a_little_more_load() -> None:
    # 20 s of short prompts with long outputs at 15 req/s: colocated x2 meets every target
    # as the window came, its 64 seats an instance nearly full, and collapses on TTFT
    # once its queue builds (~30 s into such a phase); chunked has room to spare. At the
    # window's rate the two tie (no switch); at 1.2x it, as AdaptiveConfig.load predicts,
    # chunked leads by the margin and more.
    profile = find(bundled_a100(), "opt-13b", 1)
    blocks = profile.kv_capacity_tokens // 16  # type: ignore[operator]
    window = phases((20.0, 15.0, (50, 200), (150, 250)))
    colocated, chunked = (0, 0, 2, 0), (0, 0, 0, 2)
    as_came = predict(window, profile, blocks, TTFT, TPOT, 2, chunk=512)
    assert as_came[colocated] == as_came[chunked] == 1.0
    loaded = predict(window, profile, blocks, TTFT, TPOT, 2, chunk=512, load=1.2)
    assert loaded[chunked] > 0.95 and loaded[colocated] < 0.6
    assert Hysteresis(0.05, 0.0).decide(loaded, colocated, 0.0) == chunked
    assert AdaptiveConfig("a100", TTFT, TPOT).load == 1.2
    with pytest.raises(ValueError, match="load"):
        AdaptiveConfig("a100", TTFT, TPOT, load=0.9)


def test_a_shift_to_short_prompts_turns_colocated_chunked_in_place_and_loses_nothing() -> None:
    wl = phases((6.0, *LONG), (14.0, *SHORT))
    profile = find(bundled_a100(), "opt-13b", 1)
    cfg = sim_config(PlacementConfig(mode="colocated"), profile, None, SimOptions())
    replan = AdaptiveConfig("a100", TTFT, TPOT, interval=2.0, dwell=2.0, max_requests=200)
    sim = Simulator(dataclasses.replace(cfg, adaptive=replan, live_window=6.0))
    results = sim.run(wl)
    fixed = Simulator(cfg).run(wl)
    assert all(r.e2e is not None and r.num_tokens == r.output_len for r in results)
    assert all(not i.scheduler.has_unfinished() for i in sim.instances)
    assert sim.adaptive is not None
    switches = [r for r in sim.adaptive.replans if r["switch"] is not None]
    assert [r["switch"] for r in switches] == [(0, 0, 0, 2)] and switches[0]["at"] > 6.0
    # both instances switched at once, in place: nothing drained or moved
    assert [(f["old"], f["new"], f["seconds"], f["moved"]) for f in sim.flips] == [
        ("colocated", "chunked", 0.0, 0)
    ] * 2
    assert [sim.kind(i) for i in sim.instances] == ["chunked", "chunked"]
    assert attained(results, 12.0) > attained(fixed, 12.0) + 0.2


def test_chunking_switched_on_and_off_under_load_computes_every_prompt_token_once() -> None:
    profile = find(bundled_a100(), "opt-13b", 1)
    opts = SimOptions(num_blocks=4000, prefix_caching=False)
    cfg = sim_config(PlacementConfig(mode="colocated"), profile, None, opts)
    sim = Simulator(dataclasses.replace(cfg, record_plans=True))
    wl = burst(40, 1200, 30)
    inst = sim.instances[0]
    partial: list[str] = []

    def off(t: float) -> None:
        partial.extend(
            r.request_id for r in inst.scheduler.running if r.status.name == "PREFILLING"
        )
        sim.rechunk(inst, 0, t)

    sim._at(0.05, "flip", lambda t: sim.rechunk(inst, 512, t))  # noqa: SLF001
    sim._at(0.3, "flip", off)  # noqa: SLF001
    results = sim.run(wl)
    assert partial  # a prompt was partly computed in chunks when chunking went off
    assert [(f["old"], f["new"]) for f in sim.flips] == [
        ("colocated", "chunked"),
        ("chunked", "colocated"),
    ]
    assert all(r.e2e is not None and r.num_tokens == r.output_len for r in results)
    assert all(i.scheduler.num_preemptions == 0 for i in sim.instances)
    # each prompt's positions were computed exactly once, in order, across the switches
    spans: dict[str, list[tuple[int, int]]] = {}
    for i in sim.instances:
        for plan in i.plans:
            for c in plan.chunks:
                if c.start < 1200:
                    spans.setdefault(c.request_id, []).append((c.start, c.num_tokens))
    for rid, chunks in spans.items():
        ends = [0] + [s + n for s, n in chunks]
        assert [s for s, _ in chunks] == ends[:-1] and ends[-1] == 1200, rid
    assert len(spans) == 40
    assert any(len(spans[rid]) > 1 for rid in partial)
    assert all(i.scheduler.blocks.num_used_blocks == 0 for i in sim.instances)
