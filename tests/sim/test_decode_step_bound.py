"""The simulator skips looking for a steady decode span when even the cheapest decode
step of the batch would end at the next event: that bound must never exceed the step's
real time, or a span the simulator would have taken is lost (and results change)."""

from __future__ import annotations

import math
import random

from distserve.sim.latency import latency_model
from distserve.sim.profile import Profile
from distserve.sim.serving_path import ServingPath


def test_the_cheapest_step_bound_is_below_every_steps_time() -> None:
    rng = random.Random(0)
    for _ in range(500):
        coeffs = lambda: (rng.uniform(0, 0.05), rng.uniform(0, 1e-5), rng.uniform(0, 1e-3))  # noqa: E731
        profile = Profile(
            "toy",
            "toy",
            decode_small=coeffs(),
            decode_large=coeffs(),
            decode_threshold=rng.randint(1, 64),
        )
        path = ServingPath(
            compute_scale=rng.uniform(0.5, 2),
            decode_seq_time=rng.uniform(0, 1e-3),
            step_overhead=rng.uniform(0, 1e-2),
        )
        lat = latency_model(profile, path)
        contexts = [rng.randint(0, 4000) for _ in range(rng.randint(1, 128))]
        exact = lat.decode_steps_time(contexts, 1)
        assert lat.min_decode_step_time(len(contexts)) <= exact
        # tight for the shortest contexts (each 0): the bound is that step's time
        zeros = lat.decode_steps_time([0] * len(contexts), 1)
        assert math.isclose(lat.min_decode_step_time(len(contexts)), zeros, rel_tol=1e-8)


def test_a_negative_coefficient_gives_no_bound() -> None:
    profile = Profile(
        "toy", "toy", decode_small=(0.01, -1e-6, 1e-4), decode_large=(0.01, -1e-6, 1e-4)
    )
    assert latency_model(profile, ServingPath()).min_decode_step_time(8) == -math.inf
