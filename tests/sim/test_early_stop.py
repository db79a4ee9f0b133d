"""A simulation stopped early gives the verdict of the full run (attains the target or
not), which is all the planner's bisection reads: a request is reported lost only if the
full run has it miss, and the verdicts with and without the early stops agree at rates
below, at and above each placement's capacity (issue 25)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from distserve.core import SchedulerConfig
from distserve.metrics.results import RequestResult
from distserve.metrics.slo import attains
from distserve.planner.phases import (
    InstanceConfig,
    Setting,
    at_rate,
    placement_attainment,
    placement_goodput,
    simulation,
)
from distserve.sim.profile import Profile
from distserve.sim.simulator import Simulator
from distserve.workload.build import WorkloadSpec, build_workload

TP1 = Profile(
    "toy",
    "toy",
    tp=1,
    prefill=(0.01, 4e-4, 1e-8),
    decode_small=(0.01, 1e-6, 1e-4),
    decode_large=(0.01, 1e-6, 1e-4),
    kv_capacity_tokens=60_000,
)
TP2 = Profile(
    "toy",
    "toy",
    tp=2,
    prefill=(0.01, 1e-4, 1e-8),
    decode_small=(0.01, 1e-6, 1e-4),
    decode_large=(0.01, 1e-6, 1e-4),
    kv_capacity_tokens=120_000,
)

# (name, placement_attainment's arguments): each phase alone, whole placements
CASES: list[tuple[str, dict[str, Any]]] = [
    ("prefill", dict(prefill=InstanceConfig(TP1), decode=None, only="ttft")),
    ("decode", dict(prefill=None, decode=InstanceConfig(TP1), only="tpot")),
    ("disagg", dict(prefill=InstanceConfig(TP2), decode=InstanceConfig(TP1))),
    ("colocated", dict(prefill=None, decode=None, colocated=InstanceConfig(TP1))),
    ("chunked", dict(prefill=None, decode=None, colocated=InstanceConfig(TP2), chunked=True)),
]
FACTORS = (0.5, 0.9, 0.97, 1.0, 1.03, 1.1, 2.0)
"""Rates, as multiples of the placement's goodput: the verdict flips among them."""


def _setting() -> Setting:
    spec = WorkloadSpec(
        dataset="fixed",
        num_requests=400,
        rate=1.0,
        seed=5,
        prompt_len=(32, 1024),
        output_len=(2, 96),
    )
    return Setting(
        build_workload(spec, tokenizer=None),  # type: ignore[arg-type]
        ttft_slo=0.3,
        tpot_slo=0.04,
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=2048),
        min_requests=200,
    )


def _disagreements(
    setting: Setting, kwargs: dict[str, Any], g: float | None = None
) -> list[tuple[float, float, float]]:
    """(rate, full attainment, early-stopped attainment) wherever their verdicts differ,
    at rates around the goodput `g` (default: found by the planner's bisection)."""
    g = placement_goodput(setting, **kwargs) if g is None else g
    assert g > 0
    early = placement_attainment(setting, **kwargs)
    full = placement_attainment(setting, **kwargs, exact=True)
    assert early is not None and full is not None
    out = []
    for f in FACTORS:
        a, b = full(f * g), early(f * g)
        if (a >= setting.target) != (b >= setting.target):
            out.append((f * g, a, b))
    return out


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_an_early_stopped_simulation_gives_the_full_runs_verdict(
    name: str, kwargs: dict[str, Any]
) -> None:
    assert _disagreements(_setting(), kwargs) == []


def _lost_in_overload(slo_scale: float) -> tuple[list[RequestResult], list[tuple[int, bool]]]:
    """A colocated instance at twice its goodput, run to the end with every request that
    the simulator reports lost recorded (with whether it had finished by then), the
    reports made against the SLO times `slo_scale`."""
    s = _setting()
    kwargs = dict(prefill=None, decode=None, colocated=InstanceConfig(TP1))
    setup = simulation(s, **kwargs)  # type: ignore[arg-type]
    assert setup is not None
    config, workload = setup
    rate = 2 * placement_goodput(s, **kwargs)  # type: ignore[arg-type]
    reported: list[tuple[int, bool]] = []

    def lost(r: RequestResult) -> bool:
        reported.append((r.index, r.e2e is not None))
        return False  # never stop: the run goes on to every request's end

    slo = (s.ttft_slo * slo_scale, s.tpot_slo * slo_scale)
    results = Simulator(config).run(at_rate(workload, rate), lost=lost, slo=slo)
    return results, reported


def _wrongly_lost(results: list[RequestResult], reported: list[tuple[int, bool]]) -> list[int]:
    s = _setting()
    by_index = {r.index: r for r in results}
    return [i for i, _ in reported if all(attains(by_index[i], s.ttft_slo, s.tpot_slo))]


def test_a_request_is_reported_lost_only_unfinished_and_only_if_it_misses() -> None:
    results, reported = _lost_in_overload(1.0)
    assert all(r.e2e is not None for r in results), "the run went to the end"
    assert len(reported) > len(results) // 10, "overload makes many requests late"
    assert len({i for i, _ in reported}) == len(reported), "each reported once"
    assert not any(finished for _, finished in reported)
    assert _wrongly_lost(results, reported) == []


@pytest.mark.parametrize("wrong", ["lost too soon", "passed too soon"])
def test_the_checks_catch_an_early_stop_that_decides_wrongly(
    monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    """By construction: a simulator that reports requests lost against half the SLO, or
    a planner that calls a run attained with half the hits it needs, stops runs whose
    verdict then differs from the full run's; the tests above fail on either."""
    if wrong == "lost too soon":
        results, reported = _lost_in_overload(0.5)
        assert _wrongly_lost(results, reported) != []
    s = _setting()
    goodputs = [placement_goodput(s, **kw) for _, kw in CASES]  # before the sabotage
    if wrong == "lost too soon":
        real_run = Simulator.run

        def hasty(self, workload, give_up=None, lost=None, slo=(math.inf, math.inf)):  # type: ignore[no-untyped-def]
            return real_run(self, workload, give_up, lost, (slo[0] / 2, slo[1] / 2))

        monkeypatch.setattr(Simulator, "run", hasty)
    else:
        monkeypatch.setattr("distserve.planner.phases._enough", lambda target, n: n // 2)
    assert any(_disagreements(s, kw, g) for (_, kw), g in zip(CASES, goodputs, strict=True))
