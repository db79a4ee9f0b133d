"""The serving path: every knob checked once, its dict form read back (plan files and
results of earlier runs included), and the latency model built on it."""

from __future__ import annotations

import dataclasses

import pytest

from distserve.sim.latency import latency_model
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath


def test_every_knob_has_a_help_and_a_bound() -> None:
    for f in dataclasses.fields(ServingPath):
        assert f.metadata["help"] and f.metadata["bound"] in (">= 0", "> 0"), f.name
        # a knob may be None exactly where None means something
        assert (f.default is None) == (f.metadata["unset"] is not None), f.name


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("step_overhead", -0.001),
        ("compute_scale", 0.0),
        ("compute_scale", None),
        ("decode_scale", -1.0),
        ("decode_seq_time", None),
        ("transfer_bandwidth", 0),
        ("transfer_overhead", float("inf")),
        ("contended_scale", True),
        ("contended_decode_scale", "1.2"),
    ],
)
def test_a_knob_out_of_bounds_is_an_error_naming_it(knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{knob} must be a number"):
        ServingPath(**{knob: value})  # type: ignore[arg-type]


def test_the_dict_form_round_trips_and_reads_a_saved_plans_keys() -> None:
    path = ServingPath(0.003, 0.94, 0.86, 1.02, None, 0.00012, 2.5e9, 0.005)
    assert ServingPath.from_dict(path.to_dict()) == path
    # a plan file's serving_path from before the per-request decode time was fitted
    saved = {
        "step_overhead": 0.004,
        "compute_scale": 1.05,
        "decode_scale": 0.98,
        "contended_scale": 1.18,
        "contended_decode_scale": 1.05,
        "transfer_bandwidth": 2.5e9,
    }
    assert ServingPath.from_dict(saved).to_dict() == saved | {
        "decode_seq_time": 0.0,
        "transfer_overhead": 0.0,
    }
    # a partial dict keeps the rest of its base
    base = ServingPath(compute_scale=1.1, decode_scale=1.3)
    assert ServingPath.from_dict({"compute_scale": 1.2}, base) == ServingPath(
        compute_scale=1.2, decode_scale=1.3
    )
    with pytest.raises(ValueError, match=r"unknown keys \['speed'\]"):
        ServingPath.from_dict({"speed": 2, "compute_scale": 1.0})


def test_contention_interpolates_each_phase_towards_its_contended_scale() -> None:
    path = ServingPath(compute_scale=1.0, decode_scale=1.2, contended_scale=2.0)
    assert path.contended and not ServingPath().contended
    assert path.factors() == (1.0, 1.2)
    assert path.factors(0.5) == (1.5, 1.2)  # decode has no contended scale


def test_the_latency_model_takes_the_profiles_bandwidth_unless_the_path_sets_one() -> None:
    prof = Profile("m", "cpu", fit={"transfer_bandwidth": 5e9, "kv_bytes_per_token": 100})
    lat = latency_model(prof, ServingPath(transfer_overhead=0.01))
    assert lat.transfer_bandwidth == 5e9 and lat.kv_bytes_per_token == 100
    assert lat.transfer_time(1000) == pytest.approx(0.01 + 1000 * 100 / 5e9)
    assert latency_model(prof, ServingPath(transfer_bandwidth=1e9)).transfer_bandwidth == 1e9
    assert latency_model(Profile("m", "cpu"), ServingPath()).transfer_bandwidth == 1e10
